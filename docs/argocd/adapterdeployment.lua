-- Argo CD health check for kubetune.io/v1alpha1 AdapterDeployment (see docs/argocd/README.md).
--
-- Argo CD sets the global `obj` to the resource and reads `status` and `message` from the
-- table the script returns. Scripts set in argocd-cm run with Lua's base and table libraries
-- only (no string library), so text is joined with `..` and nothing else.
--
-- Reads the conditions the operator writes (controller/serving.py: serving_status and
-- invalid_status), never the adapter list: the operator has already weighed pinned and
-- unpinned adapters, pods and agents into them.
--
--   Ready        True AllPinnedAdaptersLoaded; False ScaledToZero, NoReadyReplicas,
--                PinnedAdaptersBlocked, PinnedAdaptersNotLoaded, InvalidSpec
--   Progressing  True RollingOut, WaitingForPods, LoadingAdapters; False Complete, InvalidSpec
--   Degraded     True AdaptersFailed, RolloutStuck, PodsFailing, AgentUnreachable,
--                InvalidSpec; False AsExpected
--
-- Health, checked in this order:
--
--   Progressing  no status yet, or a status for an older generation
--   Degraded     Degraded=True: an adapter failed (pinned or not: the message adds the Ready
--                condition when the pinned adapters still serve), the rollout is stuck, pods
--                crash or cannot pull their image, an agent is unreachable, or the spec is
--                invalid
--   Suspended    Ready=False ScaledToZero (spec.replicas: 0): nothing serves, on purpose
--   Progressing  Progressing=True: the pods roll out new engine settings or adapters load
--                (even while Ready=True, as Argo CD does for a Deployment)
--   Healthy      Ready=True: every pinned adapter is loaded on every ready pod
--   Progressing  everything else: no ready pod yet, pinned adapters Blocked (waiting for
--                their FineTuneJob or a passed EvalJob) or not loaded yet

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

local hs = {
  status = "Progressing",
  message = "Waiting for the kubetune operator to report a status",
}
local status = obj.status
if status == nil or status.conditions == nil then
  return hs
end
local ready = find(status.conditions, "Ready")
if ready == nil then
  return hs
end

local observed = status.observedGeneration
if ready.observedGeneration ~= nil then
  observed = ready.observedGeneration
end
local generation = obj.metadata.generation
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local progressing = find(status.conditions, "Progressing")
local degraded = find(status.conditions, "Degraded")

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  if ready.status == "True" then
    -- An unpinned adapter failed: the pinned ones still serve.
    hs.message = hs.message .. " (still Ready: " .. describe(ready) .. ")"
  end
  return hs
end

if ready.status == "False" and ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
  hs.message = describe(ready)
  return hs
end

local changing = progressing ~= nil and progressing.status == "True"
if ready.status == "True" then
  if changing then
    hs.message = describe(progressing) .. " (still Ready: " .. describe(ready) .. ")"
  else
    hs.status = "Healthy"
    hs.message = describe(ready)
  end
  return hs
end

hs.message = describe(ready)
if changing then
  hs.message = hs.message .. "; " .. describe(progressing)
end
return hs
