"""Pure reconcile functions: custom resources in, KubeRay objects and status patches out (no I/O)."""
