"""Privacy as numbers: client-level differential privacy of adapter updates (Flower's DP
strategies and mods, with an accountant), DP for FedHDS's centroids, and secure aggregation."""
