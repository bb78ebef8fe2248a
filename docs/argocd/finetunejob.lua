-- Argo CD health check for kubetune.io/v1alpha1 FineTuneJob (see docs/argocd/README.md).
--
-- Argo CD sets the global `obj` to the resource and reads `status` and `message` from the
-- table the script returns. Scripts set in argocd-cm run with Lua's base and table libraries
-- only (no string library), so text is joined with `..` and nothing else.
--
--   Degraded     Succeeded=False: the run failed and is final (a new spec.runId runs again)
--   Healthy      Succeeded=True: the run succeeded and its artifact is published
--   Suspended    spec.suspend is set (Suspended=True), or Kueue has not admitted the Job
--                yet (Queued=True)
--   Progressing  no status yet, the operator has not observed the latest generation, or the
--                run is pending or running (Unschedulable and ImagePullBackOff included:
--                the operator waits on them, so they are not failures yet)

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

-- A status written for an older generation describes a spec that is gone (a new spec.runId,
-- say, whose run has not started): wait for the operator instead of judging it.
local succeeded = find(status.conditions, "Succeeded")
local observed = status.observedGeneration
if succeeded ~= nil and succeeded.observedGeneration ~= nil then
  observed = succeeded.observedGeneration
end
local generation = obj.metadata.generation
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end
if succeeded == nil then
  return hs
end

-- A spec edited after the run started is not applied to it (SpecApplied=False): say so.
local note = ""
local applied = find(status.conditions, "SpecApplied")
if applied ~= nil and applied.status == "False" then
  note = " (" .. describe(applied) .. ")"
end

if succeeded.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(succeeded) .. note
  return hs
end
if succeeded.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(succeeded)
  if status.artifact ~= nil and status.artifact.uri ~= nil then
    hs.message = hs.message .. "; artifact " .. status.artifact.uri
  end
  hs.message = hs.message .. note
  return hs
end

-- Succeeded=Unknown: the run has not finished.
for _, kind in ipairs({ "Suspended", "Queued" }) do
  local c = find(status.conditions, kind)
  if c ~= nil and c.status == "True" then
    hs.status = "Suspended"
    hs.message = describe(c)
    return hs
  end
end
hs.message = describe(succeeded) .. note
return hs
