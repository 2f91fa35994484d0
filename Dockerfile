# The platform image: the official Ray image of our pinned Ray (2.60.0, Python 3.11, CUDA)
# plus llm-platform with its operator, cluster and gpu extras: vLLM 0.33.0 on torch 2.14.0
# (CUDA 13 wheels: the nodes need an NVIDIA driver that supports CUDA 13), bitsandbytes and
# peft, at the pins of constraints/gpu.txt. One image runs everything on a cluster: Ray
# heads/workers of RayJobs and RayServices, the operator, and the MLflow server.
#   docker build -t ghcr.io/llm-platform/llm-platform:0.1.0 .
# GPU-less variant (kind, CI: no vLLM, torch 2.13.0, constraints/cpu.txt; the operator must then
# run with LLMOP_IMAGE_HAS_VLLM=false):
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 --build-arg VARIANT=cpu -t IMAGE .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
ARG VARIANT=gpu

# The install steps live in docker/install.sh so a test can run them without Docker.
COPY --chown=ray:users pyproject.toml README.md /home/ray/src/
COPY --chown=ray:users constraints /home/ray/src/constraints
COPY --chown=ray:users platform /home/ray/src/platform
COPY --chown=ray:users operators /home/ray/src/operators
COPY --chown=ray:users docker/install.sh /home/ray/src/docker/install.sh
RUN VARIANT=${VARIANT} /home/ray/src/docker/install.sh /home/ray/src

ENV PLATFORM_HOME=/home/ray/.llm-platform \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1
USER 1000
WORKDIR /home/ray
