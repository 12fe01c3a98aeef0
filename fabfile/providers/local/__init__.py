"""fabfile.providers.local."""
