"""fabfile.balancing."""
