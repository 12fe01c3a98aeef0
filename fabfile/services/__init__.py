"""fabfile.services."""
