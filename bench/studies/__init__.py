"""One-off studies behind a design choice (`python -m bench.studies.<name>`): head_granularity, layer_sharing,
merge_error, mixed_latent, gemv_layout. Their results go to bench/results/ like the harnesses'."""
