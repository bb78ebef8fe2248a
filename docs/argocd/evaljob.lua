-- Argo CD health check for kubetune.io/v1alpha1 EvalJob (see docs/argocd/README.md).
--
-- Argo CD sets the global `obj` to the resource and reads `status` and `message` from the
-- table the script returns. Scripts set in argocd-cm run with Lua's base and table libraries
-- only (no string library), so text is joined with `..` and nothing else.
--
--   Degraded     Succeeded=False: the evaluation could not run (e.g. FineTuneJobFailed,
--                EvaluationFailed); or it ran and a gate failed (Passed=False): the adapter
--                must not be promoted, so an Argo CD sync that waits on this EvalJob (a
--                sync wave or a PostSync hook) stops here
--   Healthy      Succeeded=True and every gate passed (Passed=True)
--   Suspended    spec.suspend is set (Suspended=True), or Kueue has not admitted the Job
--                yet (Queued=True)
--   Progressing  no status yet, the operator has not observed the latest generation, the
--                referenced FineTuneJob has not succeeded yet, or the evaluation is running

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
  -- The gates' verdict: the Passed condition, else status.passed (true when there are no gates).
  local passed = find(status.conditions, "Passed")
  local verdict
  if passed ~= nil then
    verdict = passed.status == "True"
  else
    verdict = status.passed ~= false
  end
  local failing = {}
  for _, gate in ipairs(status.gates or {}) do
    if gate.passed == false then
      local name = tostring(gate.suite) .. "/" .. tostring(gate.metric)
      table.insert(failing, name .. ": " .. tostring(gate.message))
    end
  end
  local gates = #(status.gates or {})
  if verdict then
    hs.status = "Healthy"
    if gates == 0 then
      hs.message = "Evaluation succeeded (no gates)"
    else
      local count = tostring(gates) .. "/" .. tostring(gates)
      hs.message = "Evaluation succeeded; " .. count .. " gates passed"
    end
  else
    hs.status = "Degraded"
    hs.message = "Evaluation succeeded but gates failed, so the adapter is not promoted: "
    if #failing > 0 then
      hs.message = hs.message .. table.concat(failing, "; ")
    elseif passed ~= nil then
      hs.message = hs.message .. describe(passed)
    else
      hs.message = hs.message .. "status.passed is false"
    end
  end
  hs.message = hs.message .. note
  return hs
end

-- Succeeded=Unknown: the evaluation has not finished (or waits for its FineTuneJob).
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
