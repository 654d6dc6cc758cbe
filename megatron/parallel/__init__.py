"""Model parallelism: tensor-parallel layers, shard specs, process topology, pipeline stages."""
