"""The verl adapter: the plugin entry point (`plugin`), the one seam to verl's internals (`verl_api`), the
config checks (`settings`), the anchor worker, the v1 and legacy trainers with their shared advantage step,
config composition for launches (`compose`), and the CPU mode (`cpu`)."""
