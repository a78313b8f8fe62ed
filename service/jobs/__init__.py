"""Jobs: the lifecycle every background task goes through, and its routes."""
