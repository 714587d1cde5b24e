# cython: language_level=3
"""Server-side TLS for the NBD export: pre-shared keys or certificates, over OpenSSL.

Why here.  Python's ``ssl`` module offers TLS-PSK only from Python 3.13, and
the NBD clients users have (nbdinfo, nbdcopy, qemu-img: GnuTLS inside) use
TLS-PSK with the ``psktool`` key file.  So this module drives OpenSSL itself:
a ``ServerContext`` (certificate and key, or PSK), a ``TlsSession`` that runs
the server handshake on an accepted socket, and the session's ``relay``.

Keys.  The PSK table is given per handshake (``accept(..., psk={identity:
key})``), so the caller can read the key file anew for every connection (a new
user or a changed key needs no restart).  OpenSSL asks for a key through
``_psk_lookup`` (a C callback, no GIL) with the identity the client sent; an
unknown identity gets no key and the handshake fails.  The same callback
serves TLS 1.2 PSK suites and TLS 1.3 external PSKs (OpenSSL uses it for
TLS 1.3 when no find-session callback is set, with a SHA-256 suite, which is
what GnuTLS clients offer for a plain key).

The relay.  The NBD server's transmission loop (``nbdio``) reads and writes a
plain socket from two threads, and one OpenSSL connection must not be used by
two threads at once.  So after the handshake the caller makes a socket pair:
the session (negotiation, then transmission) runs unchanged on one end, and
``relay(plain_fd)`` moves bytes between the other end and the TLS connection,
decrypting one way and encrypting the other, on a thread of its own, the only
one that touches the ``SSL`` object.  It runs without the GIL, both sockets
non-blocking, one ``poll`` for both; it ends when either side closes or fails
and says which.  Before it polls it drains what OpenSSL already decrypted, so
bytes never wait in OpenSSL's buffer for a socket event that will not come.

Client certificates.  With ``client_ca`` the context asks every client that
authenticates by certificate for one of its own, signed by that CA, and
refuses the handshake without one (``SSL_VERIFY_PEER |
SSL_VERIFY_FAIL_IF_NO_PEER_CERT``).  A PSK handshake never carries
certificates (OpenSSL sends no certificate request in a PSK handshake,
TLS 1.2 or 1.3), so PSK clients are not affected.  The common name of a
verified client certificate is the session's ``identity``, as a PSK user
name is.

Errors are ``TlsError`` (a ``ProtocolError``: the peer did something wrong or
went away), with OpenSSL's reason text, or ``UsageError`` for a bad file.
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset, strcmp

from cyclemirror.errors import ProtocolError, UsageError


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    enum:
        MSG_NOSIGNAL
        SHUT_WR

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC

cdef extern from "<openssl/x509.h>" nogil:
    ctypedef struct X509
    ctypedef struct X509_NAME
    ctypedef struct X509_STORE_CTX
    cdef struct stack_st_X509_NAME
    X509_NAME *X509_get_subject_name(const X509 *x)
    int X509_NAME_get_text_by_NID(X509_NAME *name, int nid, char *buf, int len)
    void X509_free(X509 *x)
    const char *X509_verify_cert_error_string(long n)
    enum:
        X509_V_OK

cdef extern from "<openssl/objects.h>" nogil:
    enum:
        NID_commonName

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX
    ctypedef struct SSL
    ctypedef struct SSL_METHOD
    ctypedef struct SSL_CIPHER
    const SSL_METHOD *TLS_server_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *s)
    int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *s)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    long SSL_CTX_set_dh_auto(SSL_CTX *ctx, int onoff)
    unsigned long SSL_CTX_set_options(SSL_CTX *ctx, unsigned long op)
    ctypedef unsigned int (*psk_server_cb)(SSL *ssl, const char *identity,
                                           unsigned char *psk, unsigned int max_psk_len)
    void SSL_CTX_set_psk_server_callback(SSL_CTX *ctx, psk_server_cb cb)
    ctypedef int (*verify_cb)(int preverify_ok, X509_STORE_CTX *x509_ctx)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, verify_cb callback)
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *CAfile, const char *CApath)
    stack_st_X509_NAME *SSL_load_client_CA_file(const char *file)
    void SSL_CTX_set_client_CA_list(SSL_CTX *ctx, stack_st_X509_NAME *name_list)
    int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx,
                                       unsigned int sid_ctx_len)
    X509 *SSL_get1_peer_certificate(const SSL *s)
    long SSL_get_verify_result(const SSL *ssl)
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    int SSL_set_app_data(SSL *ssl, void *arg)
    void *SSL_get_app_data(const SSL *ssl)
    int SSL_accept(SSL *ssl)
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_shutdown(SSL *ssl)
    int SSL_get_error(const SSL *ssl, int ret)
    const char *SSL_get_psk_identity(const SSL *ssl)
    const char *SSL_get_version(const SSL *ssl)
    const SSL_CIPHER *SSL_get_current_cipher(const SSL *ssl)
    const char *SSL_CIPHER_get_name(const SSL_CIPHER *c)
    enum:
        TLS1_2_VERSION
        SSL_VERIFY_PEER
        SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        SSL_FILETYPE_PEM
        SSL_MODE_ENABLE_PARTIAL_WRITE
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        SSL_OP_NO_RENEGOTIATION
        SSL_OP_CIPHER_SERVER_PREFERENCE
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN
        PSK_MAX_IDENTITY_LEN
        PSK_MAX_PSK_LEN

cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_get_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)
    void ERR_clear_error()


class TlsError(ProtocolError):
    """The TLS handshake or connection failed (wrong key, not TLS, peer went away)."""


MAX_IDENTITY = PSK_MAX_IDENTITY_LEN  # bytes of a PSK user name OpenSSL accepts
MAX_KEY = PSK_MAX_PSK_LEN  # bytes of a key
cdef enum:
    _RELAY_BUFFER = 256 * 1024  # plaintext bytes moved per system call, each way
RELAY_BUFFER = _RELAY_BUFFER

# TLS 1.2 suites: the PSK ones (GnuTLS clients offer (EC)DHE-PSK and PSK) and,
# for certificates, OpenSSL's strong defaults.  TLS 1.3 suites are OpenSSL's.
# PSK in our order of preference (the server's): forward secrecy first, ECDHE
# before DHE (cheaper), AEAD before CBC within each, plain PSK last.  OpenSSL's
# own order for "ECDHE-PSK:DHE-PSK:PSK" sorts by strength and would put plain
# PSK-AES256-GCM before ECDHE-PSK's CBC suites.
_CIPHERS_PSK = (b"kECDHEPSK+CHACHA20:kECDHEPSK:kDHEPSK+AESGCM:kDHEPSK+CHACHA20:kDHEPSK:"
                b"kPSK+AESGCM:kPSK+CHACHA20:kPSK:!NULL:!3DES:!RC4:!MD5:!ARIA:!CAMELLIA")
_CIPHERS_CERT = b"HIGH:!aNULL:!eNULL:!3DES:!RC4:!MD5"
_SUITES_TLS13 = b"TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384"


cdef struct PskTable:
    int count
    int matched  # the entry OpenSSL took (TLS 1.3 does not keep the identity), or -1
    char **identities
    unsigned char **keys
    unsigned int *key_lengths


cdef unsigned int _psk_lookup(SSL *ssl, const char *identity, unsigned char *psk,
                              unsigned int max_psk_len) noexcept nogil:
    cdef PskTable *table = <PskTable *>SSL_get_app_data(ssl)
    cdef int i
    if table == NULL or identity == NULL:
        return 0
    for i in range(table.count):
        if strcmp(table.identities[i], identity) == 0:
            if table.key_lengths[i] > max_psk_len:
                return 0
            memcpy(psk, table.keys[i], table.key_lengths[i])
            if table.matched < 0:  # OpenSSL takes the first identity that has a key
                table.matched = i
            return table.key_lengths[i]
    return 0  # unknown identity: no key, the handshake fails


cdef str _openssl_errors():
    """OpenSSL's queued error reasons, oldest first (and the queue emptied)."""
    cdef char buf[256]
    cdef unsigned long code
    reasons = []
    while True:
        code = ERR_get_error()
        if code == 0:
            break
        ERR_error_string_n(code, buf, sizeof(buf))
        reasons.append(buf.decode("utf-8", "replace"))
    return "; ".join(reasons)


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class ServerContext:
    """The server's TLS settings: PSK (``psk=True``) and/or a certificate and key.

    ``client_ca`` (with a certificate): clients that authenticate by
    certificate must present one signed by this CA (a PEM file of CA
    certificates).
    """

    cdef SSL_CTX *ctx
    cdef readonly bint psk
    cdef readonly bint certificate
    cdef readonly bint client_certificates

    def __cinit__(self):
        self.ctx = NULL

    def __init__(self, *, bint psk=False, certfile=None, keyfile=None, client_ca=None):
        if not psk and certfile is None:
            raise UsageError("TLS server context: give psk=True and/or a certificate file")
        if client_ca is not None and certfile is None:
            raise UsageError("TLS server context: client certificates (a client CA) need a "
                             "server certificate")
        ERR_clear_error()
        self.ctx = SSL_CTX_new(TLS_server_method())
        if self.ctx == NULL:
            raise UsageError(f"TLS server context: OpenSSL failed: {_openssl_errors()}")
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_2_VERSION)
        # Our order: AES-GCM first (AES-NI makes it the fastest where there is
        # AES-NI), but GnuTLS clients list ChaCha20 first.  TLS 1.3 PSKs from the
        # PSK callback need a SHA-256 suite, which both first two are.
        SSL_CTX_set_options(self.ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE)
        cdef bytes suites = _SUITES_TLS13
        SSL_CTX_set_ciphersuites(self.ctx, suites)
        SSL_CTX_set_num_tickets(self.ctx, 0)  # no resumption: every connection authenticates
        # DH parameters sized to the suite, so that DHE-PSK is offered (without them
        # a TLS 1.2 client without ECDHE-PSK would fall back to plain PSK, no PFS)
        SSL_CTX_set_dh_auto(self.ctx, 1)
        SSL_CTX_set_mode(self.ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        ciphers = _CIPHERS_PSK + b":" + _CIPHERS_CERT if psk else _CIPHERS_CERT
        if SSL_CTX_set_cipher_list(self.ctx, ciphers) != 1:
            raise UsageError(f"TLS server context: cipher list refused: {_openssl_errors()}")
        self.psk = psk
        if psk:
            SSL_CTX_set_psk_server_callback(self.ctx, _psk_lookup)
        if certfile is not None:
            cert = str(certfile).encode()
            key = str(keyfile if keyfile is not None else certfile).encode()
            if SSL_CTX_use_certificate_chain_file(self.ctx, cert) != 1:
                raise UsageError(f"TLS certificate {certfile}: cannot be used: "
                                 f"{_openssl_errors()}; give a PEM certificate (chain) file")
            if SSL_CTX_use_PrivateKey_file(self.ctx, key, SSL_FILETYPE_PEM) != 1:
                raise UsageError(f"TLS key {keyfile or certfile}: cannot be used: "
                                 f"{_openssl_errors()}; give the PEM private key of the "
                                 "certificate")
            if SSL_CTX_check_private_key(self.ctx) != 1:
                raise UsageError(f"TLS key {keyfile or certfile} does not belong to the "
                                 f"certificate {certfile}: {_openssl_errors()}")
            self.certificate = True
        cdef stack_st_X509_NAME *names
        if client_ca is not None:
            ca = str(client_ca).encode()
            if SSL_CTX_load_verify_locations(self.ctx, ca, NULL) != 1:
                raise UsageError(f"TLS client CA {client_ca}: cannot be used: "
                                 f"{_openssl_errors()}; give a PEM file of CA certificates")
            names = SSL_load_client_CA_file(ca)  # what the certificate request names
            if names == NULL:
                raise UsageError(f"TLS client CA {client_ca}: no certificate in it: "
                                 f"{_openssl_errors()}")
            SSL_CTX_set_client_CA_list(self.ctx, names)  # the context owns it now
            # OpenSSL treats a TLS 1.3 PSK handshake as a resumed session, and with
            # peer verification on it refuses one without a session id context
            if SSL_CTX_set_session_id_context(self.ctx, <const unsigned char *>b"cyclemirror-nbd",
                                              15) != 1:
                raise UsageError(f"TLS server context: OpenSSL failed: {_openssl_errors()}")
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL)
            self.client_certificates = True

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)


cdef class TlsSession:
    """One server-side TLS connection on a socket the caller owns (and closes)."""

    cdef SSL *ssl
    cdef PskTable table
    cdef readonly object context
    cdef readonly str identity  # the PSK user name or certificate common name proved, or None
    cdef readonly bint client_certificate  # the client proved a certificate of the client CA
    cdef readonly str version
    cdef readonly str cipher
    cdef readonly str end_reason

    def __cinit__(self):
        self.ssl = NULL
        memset(&self.table, 0, sizeof(PskTable))
        self.table.matched = -1

    def __dealloc__(self):
        cdef int i
        if self.ssl != NULL:
            SSL_free(self.ssl)
        for i in range(self.table.count):
            free(self.table.identities[i])
            if self.table.keys[i] != NULL:
                memset(self.table.keys[i], 0, self.table.key_lengths[i])
                free(self.table.keys[i])
        free(self.table.identities)
        free(self.table.keys)
        free(self.table.key_lengths)

    cdef int _set_keys(self, dict psk) except -1:
        cdef int n = len(psk)
        cdef int i = 0
        cdef bytes ident
        cdef bytes key
        self.table.identities = <char **>malloc(max(n, 1) * sizeof(char *))
        self.table.keys = <unsigned char **>malloc(max(n, 1) * sizeof(unsigned char *))
        self.table.key_lengths = <unsigned int *>malloc(max(n, 1) * sizeof(unsigned int))
        if (self.table.identities == NULL or self.table.keys == NULL
                or self.table.key_lengths == NULL):
            raise MemoryError()
        for name, value in psk.items():
            ident = name.encode("utf-8") if isinstance(name, str) else bytes(name)
            key = bytes(value)
            if not 0 < len(ident) <= MAX_IDENTITY or b"\0" in ident:
                raise UsageError(f"TLS-PSK: identity {name!r:.80} is empty, too long or has NUL")
            if not 0 < len(key) <= MAX_KEY:
                raise UsageError(f"TLS-PSK: the key of {name!r:.80} has {len(key)} bytes, "
                                 f"not 1-{MAX_KEY}")
            self.table.identities[i] = <char *>malloc(len(ident) + 1)
            self.table.keys[i] = <unsigned char *>malloc(len(key))
            self.table.count = i + 1  # freed by __dealloc__ from here on
            if self.table.identities[i] == NULL or self.table.keys[i] == NULL:
                raise MemoryError()
            memcpy(self.table.identities[i], <char *>ident, len(ident) + 1)
            memcpy(self.table.keys[i], <char *>key, len(key))
            self.table.key_lengths[i] = len(key)
            i += 1
        return 0

    @staticmethod
    def accept(ServerContext context, int fd, psk=None, double timeout=30.0):
        """Run the server handshake on the non-blocking socket ``fd``; a ``TlsSession``.

        ``psk`` maps identity -> key (bytes) when the context does PSK.  Raises
        TlsError when the client fails the handshake or takes over ``timeout``
        seconds in total.
        """
        cdef TlsSession self = TlsSession.__new__(TlsSession)
        cdef int rc = 0, err = 0, ready = 0
        cdef pollfd pfd
        cdef double deadline = _now() + timeout
        cdef const char *name
        self.context = context
        if context.psk:
            self._set_keys(dict(psk or {}))
        ERR_clear_error()
        self.ssl = SSL_new(context.ctx)
        if self.ssl == NULL or SSL_set_fd(self.ssl, fd) != 1:
            raise TlsError(f"TLS: cannot set up a connection: {_openssl_errors()}")
        SSL_set_app_data(self.ssl, &self.table)
        with nogil:
            while True:
                rc = SSL_accept(self.ssl)
                if rc == 1:
                    break
                err = SSL_get_error(self.ssl, rc)
                if err != SSL_ERROR_WANT_READ and err != SSL_ERROR_WANT_WRITE:
                    break
                pfd.fd = fd
                pfd.events = POLLIN if err == SSL_ERROR_WANT_READ else POLLOUT
                pfd.revents = 0
                ready = poll(&pfd, 1, <int>max(0.0, (deadline - _now()) * 1000.0))
                if ready == 0:
                    err = -2
                    break
                if ready < 0 and errno != EINTR:
                    err = -3
                    break
        if rc != 1:
            reasons = _openssl_errors()
            verify = SSL_get_verify_result(self.ssl)
            if context.client_certificates and verify != X509_V_OK:
                raise TlsError("TLS handshake: the client's certificate was refused: "
                               f"{X509_verify_cert_error_string(verify).decode()} "
                               "(the server asks for one signed by its client CA)")
            if context.client_certificates and "did not return a certificate" in reasons:
                raise TlsError("TLS handshake: the client presented no certificate (the "
                               "server requires one signed by its client CA"
                               + (", or a pre-shared key)" if context.psk else ")"))
            if err == -2:
                raise TlsError(f"TLS handshake: the client stalled past {timeout:g} s")
            if err == SSL_ERROR_SYSCALL or err == SSL_ERROR_ZERO_RETURN or err == -3:
                raise TlsError("TLS handshake: the client closed the connection"
                               + (f" ({reasons})" if reasons else
                                  " (a wrong key or user name, or the client refused us)"))
            raise TlsError(f"TLS handshake failed: {reasons or 'error ' + str(err)} "
                           "(a wrong key or user name, or not a TLS client)")
        name = NULL
        if context.psk:
            name = SSL_get_psk_identity(self.ssl)  # TLS 1.2; TLS 1.3 leaves it NULL
            if name == NULL and self.table.matched >= 0:
                name = self.table.identities[self.table.matched]
        self.identity = name.decode("utf-8", "replace") if name != NULL else None
        if self.identity is None and context.client_certificates:
            self._take_certificate()
        self.version = SSL_get_version(self.ssl).decode()
        self.cipher = SSL_CIPHER_get_name(SSL_get_current_cipher(self.ssl)).decode()
        return self

    cdef int _take_certificate(self) except -1:
        """The verified client certificate's common name becomes the identity."""
        cdef X509 *cert = SSL_get1_peer_certificate(self.ssl)
        cdef char buf[256]
        cdef int n
        if cert == NULL:
            return 0  # a PSK handshake
        try:
            if SSL_get_verify_result(self.ssl) != X509_V_OK:
                raise TlsError("TLS handshake: the client's certificate did not verify")
            self.client_certificate = True
            n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, buf,
                                          sizeof(buf))
            if n > 0:
                self.identity = buf[:n].decode("utf-8", "replace")
        finally:
            X509_free(cert)
        return 0

    def relay(self, int tls_fd, int plain_fd):
        """Move bytes between the TLS socket and the plain socket until one side ends.

        Both must be non-blocking.  Returns why it ended (also in ``end_reason``).
        When the plain side closes, a TLS close_notify is sent; when the TLS side
        closes, the plain side's write half is shut down.
        """
        cdef unsigned char *up = <unsigned char *>malloc(_RELAY_BUFFER)  # TLS -> plain
        cdef unsigned char *down = <unsigned char *>malloc(_RELAY_BUFFER)  # plain -> TLS
        cdef int why = 0
        if up == NULL or down == NULL:
            free(up)
            free(down)
            raise MemoryError()
        try:
            with nogil:
                why = _relay(self.ssl, tls_fd, plain_fd, up, down)
        finally:
            free(up)
            free(down)
        reasons = _openssl_errors()
        if why == 3 and "unexpected eof" in reasons:  # OpenSSL 3's word for a bare TCP close
            why = 4
        self.end_reason = {
            1: "the client closed TLS",
            2: "the session ended",
            3: "TLS failed" + (f": {reasons}" if reasons else ""),
            4: "the client's socket failed or closed without close_notify",
            5: "the session's socket failed",
            6: "poll failed",
        }.get(why, f"ended ({why})")
        return self.end_reason


cdef int _wait_or_end(SSL *ssl, int rc, int p, int *wants) noexcept nogil:
    """After an SSL_read/SSL_write that moved nothing: 0 and what to poll for, or the
    end code (1 close_notify, 3 TLS error, 4 socket error or EOF) with the plain side's
    write half shut down so the session sees the end."""
    cdef int err = SSL_get_error(ssl, rc)
    if err == SSL_ERROR_WANT_READ:
        wants[0] = POLLIN
        return 0
    if err == SSL_ERROR_WANT_WRITE:
        wants[0] = POLLOUT
        return 0
    shutdown(p, SHUT_WR)
    if err == SSL_ERROR_ZERO_RETURN:
        SSL_shutdown(ssl)  # our close_notify in answer, best effort (the socket is non-blocking)
        return 1
    return 4 if err == SSL_ERROR_SYSCALL else 3


cdef int _relay(SSL *ssl, int t, int p, unsigned char *up, unsigned char *down) noexcept nogil:
    """The relay loop; returns 1-6 (see ``TlsSession.relay``)."""
    cdef int ulen = 0, uoff = 0, dlen = 0, doff = 0
    cdef int read_wants = POLLIN, write_wants = POLLOUT
    cdef int rc, end
    cdef ssize_t n
    cdef bint progress
    cdef pollfd fds[2]
    while True:
        progress = True
        while progress:
            progress = False
            if ulen == 0:  # TLS -> plain: decrypt what is there (or wait for it)
                ERR_clear_error()
                rc = SSL_read(ssl, up, _RELAY_BUFFER)
                if rc > 0:
                    ulen = rc
                    uoff = 0
                    progress = True
                else:
                    end = _wait_or_end(ssl, rc, p, &read_wants)
                    if end:
                        return end
            if ulen > 0:
                n = send(p, up + uoff, ulen, MSG_NOSIGNAL)
                if n > 0:
                    uoff += n
                    ulen -= n
                    progress = True
                elif n < 0 and errno != EAGAIN and errno != EINTR:
                    return 5
            if dlen == 0:  # plain -> TLS
                n = recv(p, down, _RELAY_BUFFER, 0)
                if n > 0:
                    dlen = n
                    doff = 0
                    progress = True
                elif n == 0:
                    SSL_shutdown(ssl)  # close_notify, best effort
                    return 2
                elif errno != EAGAIN and errno != EINTR:
                    return 5
            if dlen > 0:
                ERR_clear_error()
                rc = SSL_write(ssl, down + doff, dlen)
                if rc > 0:
                    doff += rc
                    dlen -= rc
                    progress = True
                else:
                    end = _wait_or_end(ssl, rc, p, &write_wants)
                    if end:
                        return end
        # A side with nothing to wait for is left out (fd -1): its hang-up must not
        # wake the loop again and again while the other side is full.
        fds[0].fd = t
        fds[0].events = 0
        fds[0].revents = 0
        if ulen == 0:
            fds[0].events |= read_wants
        if dlen > 0:
            fds[0].events |= write_wants
        fds[1].fd = p
        fds[1].events = 0
        fds[1].revents = 0
        if dlen == 0:
            fds[1].events |= POLLIN
        if ulen > 0:
            fds[1].events |= POLLOUT
        if fds[0].events == 0:
            fds[0].fd = -1
        if fds[1].events == 0:
            fds[1].fd = -1
        if poll(fds, 2, -1) < 0 and errno != EINTR:
            return 6
        if fds[1].revents & POLLERR:
            return 5
