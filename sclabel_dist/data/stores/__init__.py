"""CellStore implementations: our sharded Zarr store and TileDB-SOMA experiments."""
