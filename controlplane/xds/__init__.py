"""xDS: snapshots, the snapshot cache, the ADS server (SotW and Delta) and sync status."""
