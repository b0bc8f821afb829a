"""FedBiOT (Wu et al., KDD'24): the whole method, server and client halves side by side."""
