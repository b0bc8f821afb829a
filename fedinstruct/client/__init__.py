"""The ClientApp's side: the node's cached model and data, and local training."""
