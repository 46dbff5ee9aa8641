"""How Ray nodes advertise their NUMA slots (custom resource ``pace_slot``), how to
start a node, and autoscaling configs (Ray cluster launcher YAML, KubeRay RayService)."""
