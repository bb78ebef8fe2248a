-- Argo CD health check for kubetune.io/v1alpha1 AdapterDeployment (see docs/argocd/README.md).
--
-- Argo CD sets the global `obj` to the resource and reads `status` and `message` from the
-- table the script returns. Scripts set in argocd-cm run with Lua's base and table libraries
-- only (no string library), so text is joined with `..` and nothing else.
--
-- Written against the API's status model (api/adapterdeployment.py): conditions Ready,
-- Progressing and Degraded, and status.adapters[].phase. The operator does not reconcile
-- AdapterDeployments yet (issue 7); until it does, they stay Progressing.
--
--   Degraded     Degraded=True; or Ready=False for a reason that waiting cannot fix
--                (InvalidSpec, AdapterLoadFailed); or a pinned adapter (spec.adapters[].pinned,
--                true by default) is Failed: pinned adapters gate readiness
--   Suspended    spec.replicas is 0: nothing is served, on purpose
--   Healthy      Ready=True for the current generation: every pinned adapter answers on the
--                ready replicas (unpinned adapters that failed are named in the message)
--   Progressing  everything else: no status yet, the operator has not observed the latest
--                generation, a rollout or an adapter load is under way, or adapters are
--                Blocked (waiting for their FineTuneJob or for a passed EvalJob)

local function find(conditions, kind)
  for _, c in ipairs(conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "Reason: message", the way `kubectl describe` reads.
local function describe(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

-- Ready=False reasons that are failures rather than waits.
local FAILED_REASONS = { InvalidSpec = true, AdapterLoadFailed = true }

local hs = {
  status = "Progressing",
  message = "Waiting for the kubetune operator to report a status",
}
local spec = obj.spec or {}
local status = obj.status
if status == nil or status.conditions == nil then
  return hs
end

local ready = find(status.conditions, "Ready")
local observed = status.observedGeneration
if ready ~= nil and ready.observedGeneration ~= nil then
  observed = ready.observedGeneration
end
local generation = obj.metadata.generation
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

-- Sort the adapters' states: pinned failures, unpinned failures, blocked.
local unpinned = {}
for _, a in ipairs(spec.adapters or {}) do
  if a.pinned == false then
    unpinned[a.name] = true
  end
end
local failed, failedUnpinned, blocked = {}, {}, {}
for _, a in ipairs(status.adapters or {}) do
  if a.phase == "Failed" then
    local text = a.name
    if a.lastError ~= nil and a.lastError ~= "" then
      text = text .. " (" .. a.lastError .. ")"
    end
    if unpinned[a.name] then
      table.insert(failedUnpinned, text)
    else
      table.insert(failed, text)
    end
  elseif a.phase == "Blocked" then
    table.insert(blocked, a.name)
  end
end

local degraded = find(status.conditions, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end
if ready ~= nil and ready.status == "False" and FAILED_REASONS[ready.reason] then
  hs.status = "Degraded"
  hs.message = describe(ready)
  return hs
end
if #failed > 0 then
  hs.status = "Degraded"
  hs.message = "Pinned adapters failed to load: " .. table.concat(failed, "; ")
  return hs
end

if spec.replicas == 0 then
  hs.status = "Suspended"
  hs.message = "Scaled to zero replicas (spec.replicas: 0): no adapter is served"
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  if #failedUnpinned > 0 then
    hs.message = hs.message .. "; unpinned adapters failed: " .. table.concat(failedUnpinned, "; ")
  end
  return hs
end

local progressing = find(status.conditions, "Progressing")
if ready ~= nil then
  hs.message = describe(ready)
elseif progressing ~= nil then
  hs.message = describe(progressing)
end
if #blocked > 0 then
  hs.message = hs.message .. "; blocked adapters (waiting for their FineTuneJob or a passed "
    .. "EvalJob): " .. table.concat(blocked, ", ")
end
return hs
