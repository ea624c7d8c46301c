"""The pipeline of `wt-datagen render`: configs, cameras, work items, static and dynamic rendering, shards
with their journal and manifest, executors, and the command."""
