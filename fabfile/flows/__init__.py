"""fabfile.flows."""
