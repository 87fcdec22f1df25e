"""Process groups, gradient communication and mask synchronisation."""
