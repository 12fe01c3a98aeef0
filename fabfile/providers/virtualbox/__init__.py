"""fabfile.providers.virtualbox."""
