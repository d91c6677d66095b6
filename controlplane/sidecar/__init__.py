"""The sidecar as the control plane ships it: its bootstrap, and its injection into pods."""
