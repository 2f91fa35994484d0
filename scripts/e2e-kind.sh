#!/usr/bin/env bash
# End-to-end on a real (local) Kubernetes: kind + KubeRay v1.7.0 + our CRDs, operator and
# MLflow (dev overlay), then the issue's flows 1 and 2 on the GPU-less image.
#
#   make e2e-kind                 # or: scripts/e2e-kind.sh
#
# Needs: docker (running), kind, kubectl, helm. Everything goes into a throwaway kind cluster
# named $CLUSTER (default llm-platform-e2e), deleted at the end unless KEEP=1.
#   1. build the GPU-less platform image (Dockerfile with RAY_IMAGE=rayproject/ray:2.60.0-py311
#      and VARIANT=cpu: constraints/cpu.txt, no vLLM) and load it into kind;
#   2. install KubeRay v1.7.0 from its Helm repo (chart kuberay-operator 1.7.0; server-side
#      apply of its CRDs), pinned like manifests/clusters/*/kuberay.yaml;
#   3. apply manifests/crds (server-side) and manifests/overlays/dev with the local image; the
#      operator is told its image has no vLLM (LLMOP_IMAGE_HAS_VLLM=false, so engine auto -> hf);
#   4. flow 1: seed the synthetic `reverse` dataset into MinIO, apply jobs/k8s/finetune-tiny.yaml
#      scaled down (1 CPU worker, 20 steps) -> RayJob -> training -> MLflow registered adapter
#      (tiny-reverse version 1) -> wait for phase Succeeded and condition Succeeded;
#   5. flow 2: an API key in the Secret llm-platform-api-keys (key `keys`, stored as its sha256
#      hash) and a ModelDeployment with auth on serving that adapter -> RayService -> condition
#      Ready -> from a pod in the cluster the openai SDK gets 200 with the key and 401 without.
# On failure it prints the CRs, the KubeRay objects and the operator's log. llama2-tiny is
# generated in the job (no model downloads).
# Where Docker isn't available (like the build machines of this project) it says why and
# exits 0 without doing anything.
set -euo pipefail

CLUSTER="${CLUSTER:-llm-platform-e2e}"
NS=llm-platform-dev
IMAGE=ghcr.io/llm-platform/llm-platform:e2e
KUBERAY_VERSION=1.7.0
TIMEOUT="${TIMEOUT:-1800}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

skip() { echo "e2e-kind: skipped: $*"; echo "e2e-kind: the same checks run offline in tests/k8s (kmock API, schema validation)."; exit 0; }
command -v docker >/dev/null 2>&1 || skip "docker is not installed"
docker info >/dev/null 2>&1 || skip "docker is installed but its daemon is not reachable ($(docker info 2>&1 | tail -1))"
for tool in kind kubectl helm; do
  command -v "$tool" >/dev/null 2>&1 || skip "$tool is not installed (needs: docker, kind, kubectl, helm)"
done

fail() {
  echo "e2e-kind: $*"
  kubectl -n "$NS" get finetunejobs,modeldeployments -o yaml || true
  kubectl -n "$NS" get rayjobs,rayservices,rayclusters,jobs,pods || true
  kubectl -n "$NS" logs job/e2e-client --tail=50 2>/dev/null || true
  kubectl -n "$NS" logs deploy/llm-operator --tail=200 || true
  echo "e2e-kind: FAILED"
  exit 1
}

# Flow 2's client (run in a pod from a ConfigMap): 200 with the key, 401 without. The adapter is
# addressed as BASE:ADAPTER; E2E_URL is the ModelDeployment's status.endpoint.
CLIENT="import os, openai
url = os.environ['E2E_URL'] + '/v1'
ask = dict(model='llama2-tiny:reverse', messages=[{'role': 'user', 'content': 'abc'}], max_tokens=8)
out = openai.OpenAI(base_url=url, api_key=os.environ['E2E_KEY']).chat.completions.create(**ask)
print('with the key: 200:', repr(out.choices[0].message.content))
try:
    openai.OpenAI(base_url=url, api_key='not-a-key').chat.completions.create(**ask)
except openai.AuthenticationError as e:
    print('without it:', e.status_code)
else:
    raise SystemExit('a request without the key was served')
"

cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "== 1/5 image (GPU-less: VARIANT=cpu)"
docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311 --build-arg VARIANT=cpu -t "$IMAGE" "$ROOT"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image "$IMAGE" --name "$CLUSTER"
kubectl config use-context "kind-$CLUSTER"

echo "== 2/5 KubeRay v$KUBERAY_VERSION"
helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm repo update kuberay >/dev/null
helm upgrade --install kuberay-operator kuberay/kuberay-operator --version "$KUBERAY_VERSION" \
  --namespace kuberay-system --create-namespace --skip-crds --wait
helm show crds kuberay/kuberay-operator --version "$KUBERAY_VERSION" | kubectl apply --server-side -f -
kubectl -n kuberay-system rollout status deploy/kuberay-operator --timeout=300s

echo "== 3/5 platform (CRDs, MLflow, operator)"
kubectl apply --server-side -k "$ROOT/manifests/crds"
kubectl kustomize "$ROOT/manifests/overlays/dev" \
  | sed "s#ghcr.io/llm-platform/llm-platform:main#$IMAGE#g; s#LLMOP_IMAGE_PULL_POLICY: Always#LLMOP_IMAGE_PULL_POLICY: IfNotPresent#" \
  | kubectl apply -f -
# The manifests' operator runs the GPU image (LLMOP_IMAGE_HAS_VLLM=true); this image has no vLLM.
kubectl -n "$NS" set env deploy/llm-operator LLMOP_IMAGE_HAS_VLLM=false
kubectl -n "$NS" rollout status statefulset/postgres --timeout=300s
kubectl -n "$NS" rollout status deploy/minio --timeout=300s
kubectl -n "$NS" rollout status deploy/mlflow --timeout=600s
kubectl -n "$NS" rollout status deploy/llm-operator --timeout=300s

echo "== 4/5 flow 1: tiny FineTuneJob -> RayJob -> registered adapter"
# Seed the synthetic `reverse` task (generated by llmplatform.tiny.tasks: no downloads) into
# MinIO at the paths jobs/k8s/finetune-tiny.yaml reads, with a one-off Job in the platform image.
kubectl -n "$NS" delete job e2e-seed-data --ignore-not-found
kubectl -n "$NS" apply -f - <<YAML
apiVersion: batch/v1
kind: Job
metadata: {name: e2e-seed-data}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: seed
          image: $IMAGE
          imagePullPolicy: IfNotPresent
          envFrom: [{secretRef: {name: llm-platform-object-store}}]
          command: ["python", "-c", "import fsspec; from llmplatform.tiny.tasks import write_task_dataset; p = write_task_dataset('reverse', '/tmp/d', n_train=512, n_eval=64); fs = fsspec.filesystem('s3', client_kwargs={'endpoint_url': 'http://minio:9000'}); [fs.put(str(p[k]), f's3://mlflow/datasets/reverse/{k}.jsonl') for k in ('train', 'eval')]"]
YAML
kubectl -n "$NS" wait --for=condition=complete job/e2e-seed-data --timeout=300s
python3 - "$ROOT/jobs/k8s/finetune-tiny.yaml" <<'PY' | kubectl -n "$NS" apply -f -
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
doc["metadata"]["name"] = "e2e-tiny"
doc["spec"]["resources"] = {"workers": 1, "cpus_per_worker": 1}
doc["spec"]["hyperparameters"]["max_steps"] = 20
print(yaml.safe_dump(doc))
PY
deadline=$((SECONDS + TIMEOUT))
while :; do
  phase="$(kubectl -n "$NS" get finetunejob e2e-tiny -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  echo "  $(date +%T) phase=${phase:-<none>} $(kubectl -n "$NS" get finetunejob e2e-tiny -o jsonpath='{.status.progress}' 2>/dev/null || true)"
  case "$phase" in
    Succeeded) break ;;
    Failed|Cancelled) fail "FineTuneJob e2e-tiny ended $phase" ;;
  esac
  [ "$SECONDS" -lt "$deadline" ] || fail "FineTuneJob e2e-tiny: timed out after ${TIMEOUT}s"
  sleep 15
done
kubectl -n "$NS" wait --for=condition=Succeeded finetunejob/e2e-tiny --timeout=60s \
  || fail "FineTuneJob e2e-tiny is Succeeded but has no Succeeded condition"
echo "  flow 1 passed"

echo "== 5/5 flow 2: ModelDeployment with auth -> RayService -> openai SDK"
KEY="e2e-$(date +%s)-$RANDOM"
kubectl -n "$NS" create secret generic e2e-client-key --from-literal=key="$KEY" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" create secret generic llm-platform-api-keys \
  --from-literal=keys="sha256:$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" apply -f - <<'YAML'
apiVersion: llmplatform.io/v1alpha1
kind: ModelDeployment
metadata: {name: e2e-chat}
spec:
  model:
    base: llama2-tiny
    adapters: [{name: reverse, source: "models:/tiny-reverse/1"}]  # what flow 1 registered
  max_model_len: 512
  auth: {enabled: true}  # keys from the Secret llm-platform-api-keys, mounted by the operator
YAML
kubectl -n "$NS" wait --for=condition=Ready modeldeployment/e2e-chat --timeout="${TIMEOUT}s" \
  || fail "ModelDeployment e2e-chat did not become Ready"
# The client runs in the cluster (the image has the openai SDK), against the RayService's serve Service.
ENDPOINT="$(kubectl -n "$NS" get modeldeployment e2e-chat -o jsonpath='{.status.endpoint}')"
[ -n "$ENDPOINT" ] || fail "ModelDeployment e2e-chat is Ready but has no status.endpoint"
kubectl -n "$NS" create configmap e2e-client --from-literal=client.py="$CLIENT" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" delete job e2e-client --ignore-not-found
kubectl -n "$NS" apply -f - <<YAML
apiVersion: batch/v1
kind: Job
metadata: {name: e2e-client}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: client
          image: $IMAGE
          imagePullPolicy: IfNotPresent
          command: ["python", "/client/client.py"]
          env:
            - {name: E2E_URL, value: "$ENDPOINT"}
            - {name: E2E_KEY, valueFrom: {secretKeyRef: {name: e2e-client-key, key: key}}}
          volumeMounts: [{name: client, mountPath: /client}]
      volumes: [{name: client, configMap: {name: e2e-client}}]
YAML
kubectl -n "$NS" wait --for=condition=complete job/e2e-client --timeout=300s || fail "the openai client did not get 200 with the key and 401 without"
kubectl -n "$NS" logs job/e2e-client
echo "  flow 2 passed"
echo "e2e-kind: PASSED"
