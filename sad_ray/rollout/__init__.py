"""Teacher engines and the stage that turns teacher trajectories into trajectory records."""
