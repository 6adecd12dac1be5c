-- Argo CD health of a regmirror.io RegistryMirror, read from the status the regmirror operator writes
-- (operator/regmirror_operator/planning.py): observedGeneration, the Ready/Reconciling/Stalled conditions,
-- status.nodes {selected, applied, failed}, failingNodes and a message naming the failing nodes.
-- Only Lua's base and table libraries are used: argocd-cm scripts run without the others by default.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if obj.status ~= nil and obj.status.message ~= nil and obj.status.message ~= "" then
    return obj.status.message
  end
  return fallback
end

local generation = obj.metadata.generation
local status = obj.status
-- observedGeneration 0: a status defaulted by the apiserver, which the operator has not written yet.
if status == nil or status.observedGeneration == nil or status.observedGeneration == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (status is of generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = message_of(stalled, "Stalled: " .. tostring(stalled.reason))
  return hs
end

local ready = condition("Ready")
local failed = 0
if status.nodes ~= nil and status.nodes.failed ~= nil then
  failed = status.nodes.failed
end
if failed > 0 or (ready ~= nil and ready.status == "False" and ready.reason == "NodesFailed") then
  local names = {}
  for _, node in ipairs(status.failingNodes or {}) do
    table.insert(names, tostring(node.name) .. ": " .. tostring(node.reason))
  end
  hs.status = "Degraded"
  hs.message = message_of(ready, tostring(failed) .. " nodes failed: " .. table.concat(names, "; "))
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = message_of(condition("Reconciling"), "Waiting for the nodes to apply generation " .. tostring(generation))
return hs
