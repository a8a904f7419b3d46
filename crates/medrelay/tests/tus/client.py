#!/usr/bin/env python3
"""Drives the real tus 1.0 client `tuspy` (module `tusclient`) against a server, for the tests.

Usage: client.py --endpoint URL --file PATH [--token T] [--push-token T] [--chunk-size N]
                 [--resume-url URL] [--stop-after N] [--terminate] [--retries N] [--metadata]
                 [--with-creation-upload]

Prints exactly one JSON line on stdout at the end (diagnostics go to stderr) and exits 0, also
when the upload failed; exits 2 on bad arguments. See client.mjs for the same driver around
tus-js-client.

What tuspy lacks, and what this driver does instead:
- termination: tuspy has no DELETE API, so --terminate sends the DELETE with `requests` (a tuspy
  dependency) and reports "terminated_by": "requests";
- creation-with-upload: unsupported, --with-creation-upload reports
  "creation_with_upload": "unsupported" and uploads with a plain POST then PATCHes;
- response headers of the POST: tuspy drops them, so the module-level `requests` functions that
  tuspy calls are wrapped (observed only, never changed) to learn the last status, the offset and
  the `Medrelay-Job` header.
"""

import argparse
import json
import os
import sys
import time

import requests

RETRY_DELAY = 0.2
state = {"status": None, "job": None, "offset": 0}


def log(*parts):
    print("tuspy-driver:", *parts, file=sys.stderr, flush=True)


def observe(method, resp):
    """Records what the client learnt from a response."""
    state["status"] = resp.status_code
    if method in ("POST", "PATCH"):
        state["job"] = resp.headers.get("Medrelay-Job")
    if 200 <= resp.status_code < 300:
        offset = resp.headers.get("Upload-Offset")
        if offset is not None and offset.isdigit() and method in ("POST", "PATCH", "HEAD"):
            state["offset"] = int(offset)
        elif method == "POST":
            state["offset"] = 0
    log(method, resp.url, resp.status_code)


def wrap(name):
    original = getattr(requests, name)

    def wrapped(url, *args, **kwargs):
        resp = original(url, *args, **kwargs)
        observe(name.upper(), resp)
        return resp

    setattr(requests, name, wrapped)


def non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def parse_args():
    p = argparse.ArgumentParser(description="tuspy driver")  # exits 2 on bad arguments
    p.add_argument("--endpoint", required=True)
    p.add_argument("--file", required=True)
    p.add_argument("--token")
    p.add_argument("--push-token")
    p.add_argument("--chunk-size", type=positive)
    p.add_argument("--resume-url")
    p.add_argument("--stop-after", type=non_negative)
    p.add_argument("--terminate", action="store_true")
    p.add_argument("--retries", type=non_negative, default=0)
    p.add_argument("--metadata", action="store_true")
    p.add_argument("--with-creation-upload", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(args.file):
        p.error("--file {} is not a readable file".format(args.file))
    return args


def main():
    args = parse_args()
    for name in ("head", "post", "patch", "delete"):
        wrap(name)
    from tusclient.client import TusClient
    from tusclient.exceptions import TusCommunicationError

    headers = {}
    if args.token is not None:
        headers["Authorization"] = "Bearer " + args.token
    if args.push_token is not None:
        headers["Push-Token"] = args.push_token
    size = os.path.getsize(args.file)
    # tuspy's upload(stop_at) loops `while offset < stop_at`, so stop_at must not pass the size.
    stop_at = None if args.stop_after is None else min(args.stop_after, size)
    client = TusClient(args.endpoint, headers=headers)
    options = {"file_path": args.file, "retries": args.retries, "retry_delay": RETRY_DELAY}
    if args.chunk_size is not None:
        options["chunk_size"] = args.chunk_size
    if args.metadata:
        options["metadata"] = {"filename": os.path.basename(args.file)}

    out = {"ok": False, "url": None, "offset": 0, "job": None, "error": None, "status": None,
           "resumes": 0, "restarted": False, "stopped": False, "terminated": False}
    if args.with_creation_upload:
        out["creation_with_upload"] = "unsupported"

    url = args.resume_url
    uploader = None
    finished = False
    while True:
        try:
            if uploader is None:
                try:
                    # With a url, the constructor sends the HEAD and takes the server's offset.
                    uploader = client.uploader(url=url, **options)
                except TusCommunicationError as err:
                    if url is None or err.status_code not in (404, 410):
                        raise
                    log("HEAD on", url, "answered", err.status_code, "- creating a new upload")
                    out["restarted"] = True
                    url = None
                    uploader = client.uploader(**options)
            if stop_at == 0:
                if not uploader.url:
                    uploader.set_url(uploader.create_url())
                    uploader.offset = 0
            else:
                uploader.upload(stop_at=stop_at)
            url = uploader.url
            finished = True
            break
        except TusCommunicationError as err:
            if uploader is not None and uploader.url:
                url = uploader.url
            network = err.status_code is None
            if network and out["resumes"] < args.retries:
                out["resumes"] += 1
                log("network error:", err, "- resuming explicitly from", url)
                uploader = None
                time.sleep(RETRY_DELAY)
                continue
            if err.status_code is not None:
                state["status"] = err.status_code
            out["error"] = str(err) or "tus communication error"
            break
        except Exception as err:  # anything else the client raises ends the run as a failure
            if uploader is not None and uploader.url:
                url = uploader.url
            out["error"] = "{}: {}".format(type(err).__name__, err)
            break

    out["url"] = url
    if finished:
        out["ok"] = True
        out["stopped"] = state["offset"] < size
    if finished and args.terminate and url:
        # tuspy has no termination API: send the DELETE the protocol describes.
        out["terminated_by"] = "requests"
        try:
            delete_headers = dict(uploader.get_headers()) if uploader else {}
            delete_headers.setdefault("Tus-Resumable", "1.0.0")
            delete_headers.update(headers)
            resp = requests.delete(url, headers=delete_headers)
            out["terminated"] = resp.status_code == 204
            if not out["terminated"]:
                out["ok"] = False
                out["error"] = "DELETE answered {}".format(resp.status_code)
        except requests.exceptions.RequestException as err:
            out["ok"] = False
            out["error"] = "DELETE failed: {}".format(err)
    out["offset"] = state["offset"]
    out["job"] = state["job"]
    out["status"] = state["status"]
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
