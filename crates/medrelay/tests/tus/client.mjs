// Drives the real tus 1.0 client `tus-js-client` (Node.js HTTP stack) against a server, for the
// tests.
//
// Usage: MEDRELAY_TUS_JS=<dir holding node_modules/tus-js-client's parent> node client.mjs
//          --endpoint URL --file PATH [--token T] [--push-token T] [--chunk-size N]
//          [--resume-url URL] [--stop-after N] [--terminate] [--retries N] [--metadata]
//          [--with-creation-upload]
//
// Prints exactly one JSON line on stdout at the end (diagnostics go to stderr) and exits 0, also
// when the upload failed; exits 2 on bad arguments. See client.py for the same driver around
// tuspy.
//
// Notes on how the options map onto tus-js-client:
// - the file is read into a Buffer (uploadSize = its length); nothing is stored for resuming
//   (storeFingerprintForResuming: false; the Node default URL storage is a no-op anyway);
// - --retries N gives retryDelays = N x 200 ms; when the client still gives up on a network
//   error and fewer than N explicit resumes were made, a new Upload is started with uploadUrl =
//   the URL so far (HEAD, then PATCH from the server's offset), counted in "resumes";
// - --stop-after N aborts in onChunkComplete once bytesAccepted >= N; without --chunk-size the
//   chunk size is then N, since a single whole-file PATCH could not stop anywhere;
// - --terminate uses upload.abort(true), i.e. the client's own DELETE (termination extension).

import fs from 'node:fs'
import path from 'node:path'
import { createRequire } from 'node:module'

const RETRY_DELAY_MS = 200

function log(...parts) {
  console.error('tus-js-driver:', ...parts)
}

function usage(message) {
  process.stderr.write(
    `client.mjs: ${message}\n` +
      'usage: node client.mjs --endpoint URL --file PATH [--token T] [--push-token T] ' +
      '[--chunk-size N] [--resume-url URL] [--stop-after N] [--terminate] [--retries N] ' +
      '[--metadata] [--with-creation-upload]\n',
  )
  process.exit(2)
}

function parseArgs(argv) {
  const valued = new Set([
    'endpoint', 'token', 'file', 'chunk-size', 'push-token', 'resume-url', 'stop-after', 'retries',
  ])
  const flags = new Set(['terminate', 'metadata', 'with-creation-upload'])
  const args = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (!arg.startsWith('--')) usage(`unexpected argument ${arg}`)
    const name = arg.slice(2)
    if (flags.has(name)) {
      args[name] = true
    } else if (valued.has(name)) {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`)
      args[name] = argv[++i]
    } else {
      usage(`unknown option ${arg}`)
    }
  }
  for (const required of ['endpoint', 'file']) {
    if (args[required] == null) usage(`--${required} is required`)
  }
  const integer = (name, min) => {
    if (args[name] == null) return null
    if (!/^\d+$/.test(args[name]) || Number(args[name]) < min) {
      usage(`--${name} must be an integer >= ${min}`)
    }
    return Number(args[name])
  }
  args['chunk-size'] = integer('chunk-size', 1)
  args['stop-after'] = integer('stop-after', 0)
  args.retries = integer('retries', 0) ?? 0
  return args
}

const args = parseArgs(process.argv.slice(2))
if (!process.env.MEDRELAY_TUS_JS) usage('MEDRELAY_TUS_JS (the node_modules holding tus-js-client) is not set')
let data
try {
  data = fs.readFileSync(args.file)
} catch (err) {
  usage(`cannot read --file ${args.file}: ${err.message}`)
}
// ESM ignores NODE_PATH: resolve the package from the directory the env var names.
const require = createRequire(path.resolve(process.env.MEDRELAY_TUS_JS) + '/')
const tus = require('tus-js-client')

const size = data.length
const headers = {}
if (args.token != null) headers.Authorization = `Bearer ${args.token}`
if (args['push-token'] != null) headers['Push-Token'] = args['push-token']
const stopAfter = args['stop-after']
let chunkSize = args['chunk-size'] ?? Number.POSITIVE_INFINITY
if (args['chunk-size'] == null && stopAfter != null && stopAfter > 0) chunkSize = stopAfter

const out = {
  ok: false,
  url: null,
  offset: 0,
  job: null,
  error: null,
  status: null,
  resumes: 0,
  restarted: false,
  stopped: false,
  terminated: false,
}
if (args['with-creation-upload']) out.creation_with_upload = true

function onAfterResponse(req, res) {
  const method = req.getMethod()
  const status = res.getStatus()
  out.status = status
  if (method === 'POST' || method === 'PATCH') out.job = res.getHeader('Medrelay-Job') ?? null
  if (status >= 200 && status < 300) {
    const offset = res.getHeader('Upload-Offset')
    if (offset != null && /^\d+$/.test(offset) && method !== 'DELETE') {
      out.offset = Number(offset)
    } else if (method === 'POST') {
      out.offset = 0
    }
  }
  // tus-js-client answers any 4xx but 423 on the resuming HEAD by creating a new upload.
  if (method === 'HEAD' && status >= 400 && status < 500 && status !== 423) {
    log(`HEAD ${req.getURL()} answered ${status}: the client creates a new upload`)
    out.restarted = true
  }
  log(method, req.getURL(), status)
}

function isNetworkError(err) {
  if (err == null || err.originalRequest == null || err.originalResponse != null) return false
  const cause = err.causingError
  if (cause == null) return false
  return (typeof cause.code === 'string' && cause.code.startsWith('E')) ||
    /socket hang up|ECONNRESET|EPIPE|ECONNREFUSED/.test(String(cause.message))
}

// One run of one Upload; resolves with what ended it.
function attempt(uploadUrl) {
  return new Promise((resolve) => {
    let settled = false
    const finish = (result) => {
      if (!settled) {
        settled = true
        resolve(result)
      }
    }
    const options = {
      endpoint: args.endpoint,
      uploadUrl: uploadUrl ?? null,
      uploadSize: size,
      chunkSize,
      headers,
      metadata: args.metadata ? { filename: path.basename(args.file) } : {},
      retryDelays: Array(args.retries).fill(RETRY_DELAY_MS),
      storeFingerprintForResuming: false,
      removeFingerprintOnSuccess: false,
      uploadDataDuringCreation: Boolean(args['with-creation-upload']),
      onAfterResponse,
      onUploadUrlAvailable() {
        if (stopAfter === 0 && out.offset < size) {
          upload.abort().then(() => finish({ kind: 'stopped', upload }))
        }
      },
      onChunkComplete(_chunk, bytesAccepted, bytesTotal) {
        out.offset = bytesAccepted
        if (stopAfter != null && bytesAccepted >= stopAfter && bytesAccepted < bytesTotal) {
          upload.abort().then(() => finish({ kind: 'stopped', upload }))
        }
      },
      onSuccess() {
        finish({ kind: 'success', upload })
      },
      onError(err) {
        finish({ kind: 'error', upload, err })
      },
    }
    const upload = new tus.Upload(data, options)
    upload.start()
  })
}

async function main() {
  let url = args['resume-url'] ?? null
  let result
  for (;;) {
    result = await attempt(url)
    if (result.upload.url) url = result.upload.url
    if (result.kind === 'error' && isNetworkError(result.err) && out.resumes < args.retries) {
      out.resumes += 1
      log(`network error (${result.err.message}): resuming explicitly from ${url}`)
      await new Promise((r) => setTimeout(r, RETRY_DELAY_MS))
      continue
    }
    break
  }
  out.url = url
  if (result.kind === 'error') {
    out.error = result.err?.message ?? String(result.err)
    const res = result.err?.originalResponse
    if (res) out.status = res.getStatus()
  } else {
    out.ok = true
    out.stopped = result.kind === 'stopped'
    if (args.terminate && url) {
      out.terminated_by = 'tus-js-client'
      try {
        await result.upload.abort(true)
        out.terminated = true
      } catch (err) {
        out.ok = false
        out.error = `terminate failed: ${err?.message ?? err}`
        if (err?.originalResponse) out.status = err.originalResponse.getStatus()
      }
    }
  }
  process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(0))
}

main().catch((err) => {
  out.error = `driver failure: ${err?.stack ?? err}`
  process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(0))
})
