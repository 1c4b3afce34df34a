"""The stack's public entry point, one concern per module.

    config      ProxyConfig and the configurations refused (no-auth off loopback, ...)
    protocol    connection level: head deadline, connections per peer, malformed requests
    routes      which route a path is for; request shapes refused everywhere; credentials out of targets
    access      token, cookie, Host and Origin rules, failure throttle, the tunnel's client address
    s3gate      /s3/: SigV4 gate in front of the object store
    forward     what is relayed to an upstream and back
    client      the HTTP/1.1 client it relays with: keep-alive pools, strict framing, reuse rules
    websocket   the /api/ws relay
    static      the UI files
    pages       the answers the proxy gives itself (JSON errors, S3 errors, sign-in page)
    redact      the one log filter that keeps credentials out of every record
    logbuffer   the log handler: records written in batches, each batch redacted
    quiet       the rate limit and length limit of lines about requests nobody vouched for
    server      the order of the checks, lifecycle, command line (`python -m installer.proxy`)
"""
