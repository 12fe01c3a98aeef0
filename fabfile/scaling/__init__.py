"""fabfile.scaling."""
