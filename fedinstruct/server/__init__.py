"""The ServerApp's side: the round loop, held-out evaluation and the run's output folder."""
