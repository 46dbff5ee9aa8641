"""How Ray nodes advertise their NUMA slots (the custom resource
``pace_core.numa.SLOT_RESOURCE``), how to start a node, and autoscaling configs (Ray
cluster launcher YAML, KubeRay RayService). Placement names come from
:mod:`pace_core.numa`; ``cluster`` never imports ``deployments``."""
