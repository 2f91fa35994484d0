-- Argo CD health of an llmplatform.io/v1alpha1 ModelDeployment, read from status.conditions
-- (metav1.Condition types Ready, Progressing, Degraded; written by the llm-platform operator).
-- Degraded -> Degraded, rolling out or not yet reconciled -> Progressing, Ready -> Healthy.
-- Shipped in argocd-cm as resource.customizations.health.llmplatform.io_ModelDeployment (Lua 5.1).
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
local generation = obj.metadata.generation
if is_true("Degraded") then
  hs.status = "Degraded"
  hs.message = (c.Degraded.reason or "Degraded") .. ": " .. (c.Degraded.message or "")
elseif generation ~= nil and c.Ready ~= nil and c.Ready.observedGeneration ~= nil and c.Ready.observedGeneration < generation then
  hs.message = "the operator has not applied generation " .. generation .. " yet"
elseif is_true("Progressing") then
  hs.message = c.Progressing.message or "rolling out"
elseif is_true("Ready") then
  hs.status = "Healthy"
  hs.message = c.Ready.message or "serving"
end
return hs
