-- wrk script for the no-key and replay scenarios: one fixed request, built once per thread, so
-- wrk's per-request cost is the same as with no script at all.
--
--   wrk -t1 -c32 -d10s -s bench/wrk/post.lua URL -- nokey
--   wrk -t1 -c32 -d10s -s bench/wrk/post.lua URL -- replay KEY
--
-- done() prints one line "BENCH_RESULT {json}" that bench/run parses.

local body = '{"amount":1000,"currency":"eur","customer":"cus_0123456789","description":"bench order 42","ref":"r-1"}'

function init(args)
   local mode = args[1] or "nokey"
   wrk.method = "POST"
   wrk.body = body
   wrk.headers["Content-Type"] = "application/json"
   if mode == "replay" then
      wrk.headers["Idempotency-Key"] = assert(args[2], "replay needs a key")
   elseif mode ~= "nokey" then
      error("unknown mode " .. mode)
   end
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
