"""The federated methods, one module or folder per paper: FedIT (`fedit`), FedHDS data
selection (`fedhds/`) and FedBiOT (`fedbiot/`). `base` defines what a method is and chooses the
run's method from the config (`server_method`, `client_method`)."""
