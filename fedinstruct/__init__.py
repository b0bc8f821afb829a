"""fedinstruct: federated instruction tuning of LLMs on Flower."""
