-- wrk script for booted's load drills and capacity bench: counts every response by status and
-- prints one JSON line (prefixed "WRK_REPORT ") with wrk's own counters when the run ends.
--
-- Argument after `--`: METHOD, GET (default) or POST (a form body name=wrk, as a browser sends it).
-- Environment: WRK_DELAY_MS, a pause before each request on a connection (wrk's delay() hook) for
-- a paced load. wrk decides whether a script paces when it loads it, before init() sees arguments,
-- hence an environment variable.
local threads = {}
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "") or 0

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   counts = {}
   local method = args[1] or "GET"
   if method == "POST" then
      wrk.method = "POST"
      wrk.body = "name=wrk"
      wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
   end
end

if delay_ms > 0 then
   function delay()
      return delay_ms
   end
end

function response(status, headers, body)
   local key = tostring(status)
   counts[key] = (counts[key] or 0) + 1
end

function done(summary, latency, requests)
   local statuses = {}
   for _, thread in ipairs(threads) do
      local c = thread:get("counts") or {}
      for k, v in pairs(c) do
         statuses[k] = (statuses[k] or 0) + v
      end
   end
   local parts = {}
   for k, v in pairs(statuses) do
      table.insert(parts, string.format('"%s": %d', k, v))
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_REPORT {"requests": %d, "duration_us": %d, "statuses": {%s}, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, table.concat(parts, ", "),
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
