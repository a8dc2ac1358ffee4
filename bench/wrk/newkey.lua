-- wrk script for the new-key scenario: every request carries an Idempotency-Key never used
-- before, "<run id>-<thread>-<counter>". The run id (a random id of the bench run plus the
-- measurement's number, passed by bench/run) keeps repeated runs, warm-ups and rounds from
-- colliding with each other's keys.
--
--   wrk -t1 -c32 -d10s -s bench/wrk/newkey.lua URL -- RUN_ID
--
-- done() prints one line "BENCH_RESULT {json}" that bench/run parses.

local body = '{"amount":1000,"currency":"eur","customer":"cus_0123456789","description":"bench order 42","ref":"r-1"}'
local threads = 0
local headers = {}
local prefix = ""
local counter = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_number", threads)
end

function init(args)
   local run_id = args[1] or tostring(os.time())
   prefix = run_id .. "-" .. tostring(thread_number or 0) .. "-"
   headers["Content-Type"] = "application/json"
   headers["Host"] = wrk.headers["Host"]
end

function request()
   counter = counter + 1
   headers["Idempotency-Key"] = prefix .. counter
   return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
   local seconds = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests":%d,"seconds":%.6f,"rps":%.2f,"p50_us":%d,"p90_us":%d,' ..
      '"p99_us":%d,"mean_us":%.1f,"max_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
      '"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
      summary.requests, seconds, summary.requests / seconds,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout))
end
