"""fabfile.core."""
