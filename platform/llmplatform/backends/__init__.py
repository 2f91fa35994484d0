"""Where fine-tuning jobs run: the local stack (`local`), any Ray cluster through the Ray Jobs
API (`ray`), or Kubernetes (`k8s`). Each target implements `base.JobBackend`; `records` keeps
one JSON record per job under `paths.jobs_dir()`.
"""
