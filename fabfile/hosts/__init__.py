"""fabfile.hosts."""
