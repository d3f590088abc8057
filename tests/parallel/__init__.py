"""Context parallelism: sharded and ring attention on gloo ranks, and the diffusers context-parallel path."""
