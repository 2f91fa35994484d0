"""llmoperator: a kopf operator translating FineTuneJob/ModelDeployment into KubeRay RayJob/RayService."""
