"""Runtime: profiling now; the latent cache, absorbed decode and chat come with the runtime issue."""
