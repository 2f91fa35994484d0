-- Argo CD health of an llmplatform.io/v1alpha1 EvaluationJob, read from status.conditions
-- (metav1.Condition types Running, Succeeded, Failed; written by the llm-platform operator).
-- Succeeded -> Healthy, Failed -> Degraded, cancelled -> Suspended, anything else -> Progressing.
-- Shipped in argocd-cm as resource.customizations.health.llmplatform.io_EvaluationJob (Lua 5.1).
local hs = {status = "Progressing", message = "waiting for the llm-platform operator to report status"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local c = {}
for _, condition in ipairs(obj.status.conditions) do
  c[condition.type] = condition
end
local function is_true(t)
  return c[t] ~= nil and c[t].status == "True"
end
if is_true("Succeeded") then
  hs.status = "Healthy"
  hs.message = c.Succeeded.message or "succeeded"
elseif is_true("Failed") then
  hs.status = "Degraded"
  hs.message = (c.Failed.reason or "Failed") .. ": " .. (c.Failed.message or "")
elseif obj.status.phase == "Cancelled" then
  hs.status = "Suspended"
  hs.message = "cancelled: " .. (c.Running and c.Running.message or "")
elseif is_true("Running") then
  hs.message = c.Running.message or "running"
elseif c.Running ~= nil then
  hs.message = (c.Running.reason or "Pending") .. ": " .. (c.Running.message or "")
end
if obj.status.progress ~= nil and hs.status == "Progressing" then
  hs.message = hs.message .. " (" .. obj.status.progress .. ")"
end
return hs
