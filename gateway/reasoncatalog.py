"""The reason catalogue: what every reason id means and what to do about it, in English and
Norwegian (bokmål). Rendered as docs/reasons.md (``portvakt reasons``), kept equal by a test.

Public reasons (the ``reason`` of a problem+json answer, with the status the registry in
gateway/problems.py gives them) and internal reasons (audit records, the access log and the
``reason`` label of ``portvakt_filter_decisions_total``; the client sees the public reason they
map to). The tests check that every registered public reason and every internal reason found in
the source has an entry here, and that nothing here is stale.

Each entry: (who acts, meaning en, meaning no, action en, action no); internal entries start
with the public reason the client sees. ``who``: integrator (the caller), operator (who runs
Portvakt), both.
"""

from __future__ import annotations

import importlib

Entry = tuple[str, str, str, str, str]

PUBLIC: dict[str, Entry] = {
    "bad_request": ("integrator", "The request is malformed: the HTTP parser refused it, an absolute-form target names another host, CONNECT, an unreadable body, or an ambiguous path on a templated route.", "Forespørselen er feilformet: HTTP-parseren avviste den, et absolutt mål peker på en annen vert, CONNECT, en ulesbar kropp eller en tvetydig sti på en rute med mal.", "Send a well-formed HTTP/1.1 request with a plain path; quote the request_id when asking the operator.", "Send en velformet HTTP/1.1-forespørsel med en vanlig sti; oppgi request_id når du spør driftsansvarlig."),
    "bad_path": ("integrator", "The path has a NUL byte, invalid UTF-8 or percent-encoding, or dot segments or encoded slashes that would leave the route's prefix.", "Stien har NUL-byte, ugyldig UTF-8 eller prosentkoding, eller punktsegmenter eller kodede skråstreker som ville forlate rutens prefiks.", "Send the canonical path (no ../, no %2F, valid UTF-8).", "Send den kanoniske stien (ingen ../, ingen %2F, gyldig UTF-8)."),
    "waf_body_unparsable": ("integrator", "The body does not parse as its Content-Type and waf.on_unparsable_body is reject.", "Kroppen lar seg ikke tolke som sin Content-Type, og waf.on_unparsable_body er reject.", "Send a body that matches its Content-Type (valid JSON for application/json).", "Send en kropp som stemmer med Content-Type (gyldig JSON for application/json)."),
    "request_smuggling": ("integrator", "Ambiguous framing: both Content-Length and Transfer-Encoding, differing Content-Lengths, or a Transfer-Encoding other than chunked.", "Tvetydig rammeverk: både Content-Length og Transfer-Encoding, ulike Content-Length, eller annen Transfer-Encoding enn chunked.", "Send one Content-Length or chunked encoding, never both; check intermediaries that rewrite framing.", "Send én Content-Length eller chunked, aldri begge; sjekk mellomledd som skriver om rammingen."),
    "invalid_organization_number": ("integrator", "The target organisation number in the path or header fails its mod-11 check digit.", "Målorganisasjonens organisasjonsnummer i stien eller headeren har feil kontrollsiffer (mod 11).", "Use the organisation's nine-digit number from Enhetsregisteret.", "Bruk organisasjonens nisifrede nummer fra Enhetsregisteret."),
    "invalid_national_identity_number": ("integrator", "A fødselsnummer or D-number in the path fails its check digits.", "Et fødselsnummer eller D-nummer i stien har feil kontrollsifre.", "Check the number; it is never echoed back.", "Kontroller nummeret; det gjentas aldri i svaret."),
    "authentication_required": ("integrator", "The route needs credentials and none were sent.", "Ruten krever legitimasjon, og ingen ble sendt.", "Send a Maskinporten or ID-porten bearer token (and the integration headers where the route needs them).", "Send et Maskinporten- eller ID-porten-token (og integrasjonsheaderne der ruten krever dem)."),
    "invalid_token": ("integrator", "The bearer token is malformed, expired, from an unknown issuer, for another audience, wrongly signed or of the wrong kind; the internal reason says which.", "Tokenet er feilformet, utløpt, fra ukjent utsteder, for en annen mottaker, feil signert eller av feil type; den interne årsaken sier hvilken.", "Fetch a fresh token for this audience and scope; the operator can read the precise reason in the audit record for the request_id.", "Hent et nytt token for riktig mottaker og scope; driftsansvarlig finner presis årsak i revisjonsloggen for request_id."),
    "integration_auth_failed": ("integrator", "The Fiks integration check failed (unknown id, wrong password, organisation or certificate mismatch); the client never learns which.", "Fiks-integrasjonskontrollen feilet (ukjent id, feil passord, organisasjon eller sertifikat stemmer ikke); klienten får aldri vite hvilken.", "Check IntegrasjonId, IntegrasjonPassord and that the token's consumer organisation is the integration's; the operator sees the internal reason.", "Kontroller IntegrasjonId, IntegrasjonPassord og at tokenets consumer-organisasjon er integrasjonens; driftsansvarlig ser den interne årsaken."),
    "admin_token_required": ("operator", "POST /-/reload on the admin listener without the configured reload token.", "POST /-/reload på admin-lytteren uten det konfigurerte reload-tokenet.", "Send Authorization: Bearer <admin.reload_token>.", "Send Authorization: Bearer <admin.reload_token>."),
    "access_denied": ("integrator", "Credentials were valid but no rule in the route's access policy admits them.", "Legitimasjonen var gyldig, men ingen regel i rutens tilgangspolicy slipper den inn.", "Ask the service owner which credential the route accepts.", "Spør tjenesteeier hvilken legitimasjon ruten godtar."),
    "certificate_invalid": ("integrator", "The client certificate (direct or forwarded by a trusted proxy) could not be verified or parsed.", "Klientsertifikatet (direkte eller videresendt av en betrodd proxy) kunne ikke verifiseres eller tolkes.", "Use a certificate chaining to the configured CA; operators check certificates.forwarded_format and trusted_proxies.", "Bruk et sertifikat som kjeder til konfigurert CA; driftsansvarlig sjekker certificates.forwarded_format og trusted_proxies."),
    "certificate_revoked": ("integrator", "The client certificate is on a configured CRL.", "Klientsertifikatet står på en konfigurert sperreliste (CRL).", "Obtain a new enterprise certificate.", "Skaff et nytt virksomhetssertifikat."),
    "insufficient_acr": ("integrator", "The person's ID-porten level is below the route's minimum.", "Personens ID-porten-nivå er lavere enn rutens minimum.", "Log in again at the required level (step-up).", "Logg inn på nytt med påkrevd nivå (step-up)."),
    "insufficient_scope": ("integrator", "The token lacks a scope the route requires.", "Tokenet mangler et scope ruten krever.", "Request a token with the route's scope (e.g. ks:fiks).", "Be om et token med rutens scope (f.eks. ks:fiks)."),
    "integration_required": ("integrator", "The route admits integrations only, and the token came without integration credentials.", "Ruten slipper bare inn integrasjoner, og tokenet kom uten integrasjonslegitimasjon.", "Send IntegrasjonId and IntegrasjonPassord.", "Send IntegrasjonId og IntegrasjonPassord."),
    "ip_denied": ("both", "The client address is on ingress.deny_cidrs or not on a non-empty ingress.allow_cidrs.", "Klientadressen står på ingress.deny_cidrs eller ikke på en ikke-tom ingress.allow_cidrs.", "Integrators: call from an allowed network. Operators: check the lists and trusted_proxies (X-Forwarded-For).", "Integratører: kall fra et tillatt nett. Drift: sjekk listene og trusted_proxies (X-Forwarded-For)."),
    "missing_privilege": ("integrator", "The target organisation has not granted this integration access to the route's service (or withdrew it).", "Målorganisasjonen har ikke gitt denne integrasjonen tilgang til rutens tjeneste (eller har trukket den tilbake).", "Ask the organisation's administrator to grant the service to the integration.", "Be organisasjonens tjenesteforvalter om å gi integrasjonen tilgang til tjenesten."),
    "not_own_data": ("integrator", "A person tried to reach another person's data.", "En person forsøkte å nå en annen persons data.", "Persons may only use their own identity number in the path.", "Personer kan bare bruke sitt eget fødselsnummer i stien."),
    "waf_blocked": ("both", "The WAF's anomaly score reached the threshold; the matched rule ids are in the audit record.", "WAF-ens anomalipoeng nådde terskelen; treffende regel-id-er står i revisjonsloggen.", "Integrators: remove attack-like content. Operators: for a false positive add a route-level waf exclusion for the rule id in the audit record.", "Integratører: fjern angrepslignende innhold. Drift: ved falsk positiv, legg til et waf-unntak på ruten for regel-id-en i revisjonsloggen."),
    "no_route": ("integrator", "No route matches the host and path.", "Ingen rute passer verten og stien.", "Check the URL against the service's documentation.", "Sjekk URL-en mot tjenestens dokumentasjon."),
    "method_not_allowed": ("integrator", "The route matched but does not serve this method; the Allow header lists those it does.", "Ruten passet, men betjener ikke denne metoden; Allow-headeren viser hvilke den betjener.", "Use a method from Allow.", "Bruk en metode fra Allow."),
    "body_too_large": ("integrator", "The body exceeds ingress.max_body_bytes (declared or while streaming).", "Kroppen er større enn ingress.max_body_bytes (oppgitt eller under strømming).", "Send a smaller body or ask for a higher limit.", "Send en mindre kropp eller be om høyere grense."),
    "waf_body_limit": ("integrator", "The body exceeds what the WAF inspects and waf.on_inspection_limit is reject.", "Kroppen er større enn det WAF-en inspiserer, og waf.on_inspection_limit er reject.", "Send a smaller body; operators may raise waf.inspection_limit_bytes.", "Send en mindre kropp; drift kan øke waf.inspection_limit_bytes."),
    "uri_too_long": ("integrator", "The request target exceeds ingress.max_uri_bytes.", "Forespørselsmålet er lengre enn ingress.max_uri_bytes.", "Move data from the query string into a body.", "Flytt data fra spørrestrengen til en kropp."),
    "host_not_allowed": ("both", "The Host header is not in ingress.allowed_hosts.", "Host-headeren står ikke i ingress.allowed_hosts.", "Call the published host name; operators check allowed_hosts.", "Bruk det publiserte vertsnavnet; drift sjekker allowed_hosts."),
    "config_rejected": ("operator", "A reload (POST /-/reload) found problems in the new config; the running config stays in force.", "En omlasting (POST /-/reload) fant feil i ny konfigurasjon; den kjørende konfigurasjonen gjelder fortsatt.", "Fix every line in problems (portvakt check-config shows the same) and reload again.", "Rett hver linje i problems (portvakt check-config viser det samme) og last inn på nytt."),
    "rate_limited": ("integrator", "A rate limit refused the request; Retry-After says when to try again.", "En ratebegrensning avviste forespørselen; Retry-After sier når du kan prøve igjen.", "Wait Retry-After seconds; spread calls (the RateLimit header shows what is left).", "Vent Retry-After sekunder; spre kallene (RateLimit-headeren viser hva som er igjen)."),
    "too_many_failed_attempts": ("integrator", "Repeated failed integration authentications: back-off or lockout.", "Gjentatte mislykkede integrasjonsautentiseringer: forsinkelse eller sperring.", "Stop retrying with the wrong password; wait Retry-After and fix the credentials.", "Slutt å prøve med feil passord; vent Retry-After og rett legitimasjonen."),
    "headers_too_large": ("integrator", "Too many header fields, or too large ones.", "For mange eller for store headerfelt.", "Send fewer or smaller headers (large cookies are the usual cause).", "Send færre eller mindre headere (store informasjonskapsler er vanlig årsak)."),
    "internal_error": ("operator", "An unexpected error inside a policy stage or the gateway; the request was denied (fail closed).", "En uventet feil i et policysteg eller i gatewayen; forespørselen ble avvist (fail closed).", "Find the request_id in the application log (it has the traceback) and report it.", "Finn request_id i applikasjonsloggen (den har stakksporet) og rapporter den."),
    "upstream_unavailable": ("operator", "The upstream refused or reset the connection.", "Bakenforliggende tjeneste avviste eller brøt forbindelsen.", "Check the upstream's health and upstreams.<name>.url; integrators retry later.", "Sjekk tjenestens helse og upstreams.<name>.url; integratører prøver igjen senere."),
    "audit_unavailable": ("operator", "audit.durability is strict and the audit record could not be written in time; the request was not forwarded.", "audit.durability er strict og revisjonsposten kunne ikke skrives i tide; forespørselen ble ikke videresendt.", "Check the audit disk (space, latency) and portvakt_audit_write_errors_total.", "Sjekk revisjonsdisken (plass, forsinkelse) og portvakt_audit_write_errors_total."),
    "filter_timeout": ("operator", "A policy stage did not answer in time (fail closed).", "Et policysteg svarte ikke i tide (fail closed).", "See which stage in the internal reason (<filter>_timeout) and its dependency (Redis, JWKS).", "Se hvilket steg i den interne årsaken (<filter>_timeout) og dets avhengighet (Redis, JWKS)."),
    "issuer_keys_unavailable": ("operator", "The token issuer's keys were never obtained (JWKS unreachable since start).", "Utstederens nøkler er aldri hentet (JWKS utilgjengelig siden start).", "Check issuers.<name>.jwks_uri reachability; /readyz shows it.", "Sjekk at issuers.<name>.jwks_uri kan nås; /readyz viser det."),
    "rate_limit_unavailable": ("operator", "Redis is down and rate_limit.on_backend_error is deny.", "Redis er nede og rate_limit.on_backend_error er deny.", "Restore Redis; portvakt_rate_limit_breaker_state shows the breaker.", "Gjenopprett Redis; portvakt_rate_limit_breaker_state viser bryteren."),
    "shutting_down": ("integrator", "The gateway is draining after SIGTERM.", "Gatewayen tømmes etter SIGTERM.", "Retry against another instance.", "Prøv igjen mot en annen instans."),
    "upstream_timeout": ("operator", "The upstream did not send response headers within upstreams.<name>.timeout_seconds.", "Tjenesten sendte ikke svarheadere innen upstreams.<name>.timeout_seconds.", "Check the upstream's latency or raise the timeout.", "Sjekk tjenestens svartid eller øk tidsavbruddet."),
}

INTERNAL: dict[str, Entry] = {
    # tokens
    "token_malformed": ("invalid_token", "Not a compact JWS, or undecodable header or claims.", "Ikke en kompakt JWS, eller header/claims kan ikke dekodes.", "Send the raw access token after 'Bearer '.", "Send selve tilgangstokenet etter 'Bearer '."),
    "token_unknown_issuer": ("invalid_token", "The token's iss is not a configured issuer.", "Tokenets iss er ikke en konfigurert utsteder.", "Use a token from Maskinporten/ID-porten of the right environment (test vs production).", "Bruk token fra Maskinporten/ID-porten i riktig miljø (test eller produksjon)."),
    "token_alg_not_allowed": ("invalid_token", "The algorithm is not in the issuer's algorithms (none, HMAC and key confusion are always refused).", "Algoritmen står ikke i utstederens algorithms (none, HMAC og nøkkelforveksling avvises alltid).", "Use a token signed by the issuer itself.", "Bruk et token signert av utstederen selv."),
    "token_crit_unsupported": ("invalid_token", "The header lists a crit extension Portvakt does not understand.", "Headeren har en crit-utvidelse Portvakt ikke forstår.", "Use a standard token.", "Bruk et standard token."),
    "token_unknown_kid": ("invalid_token", "No key with this kid, even after a throttled JWKS refresh.", "Ingen nøkkel med denne kid, heller ikke etter en begrenset JWKS-oppdatering.", "Operators: check the issuer's JWKS; integrators: a token from another environment?", "Drift: sjekk utstederens JWKS; integratører: token fra et annet miljø?"),
    "token_bad_signature": ("invalid_token", "The signature does not verify.", "Signaturen kan ikke verifiseres.", "The token was altered or forged; fetch a new one.", "Tokenet er endret eller forfalsket; hent et nytt."),
    "token_expired": ("invalid_token", "exp is past (beyond leeway).", "exp er passert (utover slingringsmonn).", "Fetch a new token before the old one expires; check the client's clock.", "Hent nytt token før det gamle utløper; sjekk klientens klokke."),
    "token_not_yet_valid": ("invalid_token", "nbf or iat lies in the future (beyond leeway).", "nbf eller iat ligger i fremtiden (utover slingringsmonn).", "Check the clocks (NTP) of the client and the gateway.", "Sjekk klokkene (NTP) hos klient og gateway."),
    "token_bad_audience": ("invalid_token", "aud does not contain the issuer's configured audience.", "aud inneholder ikke utstederens konfigurerte mottaker.", "Request the token for this service's audience.", "Be om tokenet for denne tjenestens mottaker (audience)."),
    "token_claims_invalid": ("invalid_token", "A required claim is missing or has the wrong type (consumer, scope, pid, acr ...).", "Et påkrevd claim mangler eller har feil type (consumer, scope, pid, acr ...).", "Use a token of the documented kind.", "Bruk et token av dokumentert type."),
    "token_kind_mismatch": ("invalid_token", "The token is of another kind than the issuer (e.g. an ID-porten id_token used as access token).", "Tokenet er av en annen type enn utstederen (f.eks. et ID-porten id_token brukt som tilgangstoken).", "Send the access token, not the id_token.", "Send tilgangstokenet, ikke id_token."),
    # integrations
    "integration_unknown": ("integration_auth_failed", "No integration with this IntegrasjonId.", "Ingen integrasjon med denne IntegrasjonId.", "Check the id; operators check integrations[].id.", "Sjekk id-en; drift sjekker integrations[].id."),
    "integration_bad_password": ("integration_auth_failed", "IntegrasjonPassord does not match the argon2id hash.", "IntegrasjonPassord stemmer ikke med argon2id-hashen.", "Use the current password; repeated failures lead to lockout.", "Bruk gjeldende passord; gjentatte feil fører til sperring."),
    "integration_org_mismatch": ("integration_auth_failed", "The token's consumer organisation is not the integration's authorized_org.", "Tokenets consumer-organisasjon er ikke integrasjonens authorized_org.", "Use a Maskinporten token of the organisation the integration belongs to.", "Bruk et Maskinporten-token for organisasjonen integrasjonen tilhører."),
    "integration_cert_mismatch": ("integration_auth_failed", "The client certificate's organisation is not the integration's.", "Klientsertifikatets organisasjon er ikke integrasjonens.", "Use the enterprise certificate of the integration's organisation.", "Bruk virksomhetssertifikatet til integrasjonens organisasjon."),
    "integration_cert_required": ("integration_auth_failed", "The integration requires a client certificate and none was presented.", "Integrasjonen krever klientsertifikat, og ingen ble vist.", "Connect with mTLS using the enterprise certificate.", "Koble til med mTLS og virksomhetssertifikatet."),
    "integration_token_missing": ("integration_auth_failed", "Integration headers without a verified Maskinporten token.", "Integrasjonsheadere uten et verifisert Maskinporten-token.", "Send the bearer token with the integration headers.", "Send tokenet sammen med integrasjonsheaderne."),
    "integration_credentials_incomplete": ("integration_auth_failed", "Only one of IntegrasjonId and IntegrasjonPassord was sent.", "Bare én av IntegrasjonId og IntegrasjonPassord ble sendt.", "Send both headers.", "Send begge headerne."),
    "integration_id_malformed": ("integration_auth_failed", "IntegrasjonId is not a UUID.", "IntegrasjonId er ikke en UUID.", "Send the integration's UUID.", "Send integrasjonens UUID."),
    # ingress
    "ip_in_deny_list": ("ip_denied", "The client address is in ingress.deny_cidrs.", "Klientadressen står i ingress.deny_cidrs.", "Operators: remove it from the list if wrongly denied.", "Drift: fjern den fra listen om den er feilaktig avvist."),
    "ip_not_in_allow_list": ("ip_denied", "ingress.allow_cidrs is set and the client address is not in it.", "ingress.allow_cidrs er satt og klientadressen står ikke der.", "Operators: add the caller's network, or trusted_proxies if a proxy hides it.", "Drift: legg til kallerens nett, eller trusted_proxies om en proxy skjuler den."),
    "too_many_headers": ("headers_too_large", "More header fields than ingress.max_headers.", "Flere headerfelt enn ingress.max_headers.", "Send fewer headers.", "Send færre headere."),
    "header_bytes": ("headers_too_large", "Header bytes exceed ingress.max_header_bytes.", "Headerbytes overstiger ingress.max_header_bytes.", "Send smaller headers.", "Send mindre headere."),
    "nul_in_path": ("bad_path", "A NUL byte (raw or %00) in the path.", "En NUL-byte (rå eller %00) i stien.", "Remove it.", "Fjern den."),
    "bad_percent_encoding": ("bad_path", "A % not followed by two hex digits.", "En % som ikke følges av to heksadesimale sifre.", "Percent-encode correctly.", "Prosentkod riktig."),
    "bad_encoding": ("bad_path", "An encoded separator (%2F, %5C) the route does not accept.", "En kodet skilletegn (%2F, %5C) ruten ikke godtar.", "Send plain separators.", "Send vanlige skilletegn."),
    "invalid_utf8": ("bad_path", "The decoded path is not UTF-8.", "Den dekodede stien er ikke UTF-8.", "Encode the path as UTF-8.", "Kod stien som UTF-8."),
    "path_escapes_prefix": ("bad_path", "Dot segments would take the path out of the route's prefix.", "Punktsegmenter ville ført stien ut av rutens prefiks.", "Send the canonical path.", "Send den kanoniske stien."),
    "te_and_cl": ("request_smuggling", "Both Transfer-Encoding and Content-Length.", "Både Transfer-Encoding og Content-Length.", "Send only one.", "Send bare én."),
    "bad_transfer_encoding": ("request_smuggling", "A Transfer-Encoding other than chunked.", "En annen Transfer-Encoding enn chunked.", "Use chunked or Content-Length.", "Bruk chunked eller Content-Length."),
    "te_in_http10": ("request_smuggling", "Transfer-Encoding in an HTTP/1.0 request.", "Transfer-Encoding i en HTTP/1.0-forespørsel.", "Use HTTP/1.1 or Content-Length.", "Bruk HTTP/1.1 eller Content-Length."),
    "conflicting_content_length": ("request_smuggling", "Several different Content-Length values.", "Flere ulike Content-Length-verdier.", "Send one Content-Length.", "Send én Content-Length."),
    "invalid_content_length": ("request_smuggling", "A Content-Length that is not a decimal number.", "En Content-Length som ikke er et desimaltall.", "Send a valid Content-Length.", "Send en gyldig Content-Length."),
    # certificates
    "certificate_header_malformed": ("certificate_invalid", "The forwarded client-certificate header from a trusted proxy could not be parsed.", "Den videresendte sertifikatheaderen fra en betrodd proxy kunne ikke tolkes.", "Operators: check certificates.forwarded_format matches the load balancer.", "Drift: sjekk at certificates.forwarded_format passer lastbalansereren."),
    "certificate_no_ca": ("certificate_invalid", "A forwarded certificate arrived but no CA bundle is configured to verify it.", "Et videresendt sertifikat kom, men ingen CA-bunt er konfigurert for å verifisere det.", "Operators: set certificates.ca_file.", "Drift: sett certificates.ca_file."),
    "certificate_chain_invalid": ("certificate_invalid", "The forwarded certificate does not chain to the CA bundle, or is expired.", "Det videresendte sertifikatet kjeder ikke til CA-bunten, eller er utløpt.", "Use a valid certificate from the accepted CA.", "Bruk et gyldig sertifikat fra godkjent CA."),
    # authorize
    "ambiguous_path": ("bad_request", "A templated route (organisation or person in the path) met dot segments or encoded separators.", "En rute med mal (organisasjon eller person i stien) møtte punktsegmenter eller kodede skilletegn.", "Send the canonical path.", "Send den kanoniske stien."),
    "organization_header_repeated": ("invalid_organization_number", "The header naming the target organisation was sent more than once.", "Headeren som angir målorganisasjonen ble sendt mer enn én gang.", "Send the header once.", "Send headeren én gang."),
    # rate limit
    "rate_limit_backend_down": ("rate_limit_unavailable", "Redis failed and on_backend_error is deny.", "Redis feilet og on_backend_error er deny.", "Operators: restore Redis.", "Drift: gjenopprett Redis."),
    # WAF
    "waf_args_over_limit": ("waf_blocked", "More arguments than the WAF inspects.", "Flere argumenter enn WAF-en inspiserer.", "Send fewer parameters.", "Send færre parametere."),
    "waf_body_over_limit": ("waf_body_limit", "The body is larger than waf.inspection_limit_bytes.", "Kroppen er større enn waf.inspection_limit_bytes.", "Send a smaller body.", "Send en mindre kropp."),
    # server, proxy, audit
    "connect_method": ("bad_request", "CONNECT: Portvakt is never a forward proxy.", "CONNECT: Portvakt er aldri en forover-proxy.", "Call the service URL directly.", "Kall tjenestens URL direkte."),
    "absolute_form_target": ("bad_request", "An absolute-form request target for another host.", "Et absolutt forespørselsmål for en annen vert.", "Send a path, not a URL.", "Send en sti, ikke en URL."),
    "gateway_error": ("internal_error", "An unexpected error in the gateway outside the stages.", "En uventet feil i gatewayen utenfor stegene.", "Operators: the log line with this request_id has the traceback.", "Drift: logglinjen med denne request_id har stakksporet."),
    "upstream_session_closed": ("upstream_unavailable", "The upstream's connection pool was closed (during a reload).", "Tilkoblingspoolen mot tjenesten var lukket (under en omlasting).", "Retry; persistent: report it.", "Prøv igjen; vedvarer det, rapporter det."),
    "audit_queue_full": ("audit_unavailable", "strict audit: the audit queue is full.", "strict revisjon: revisjonskøen er full.", "Operators: check the audit disk's throughput.", "Drift: sjekk revisjonsdiskens ytelse."),
    "audit_timeout": ("audit_unavailable", "strict audit: the fsync did not finish within audit.strict_timeout_seconds.", "strict revisjon: fsync ble ikke ferdig innen audit.strict_timeout_seconds.", "Operators: check the audit disk's latency.", "Drift: sjekk revisjonsdiskens forsinkelse."),
    "audit_write_failed": ("audit_unavailable", "strict audit: writing the record failed.", "strict revisjon: skriving av posten feilet.", "Operators: check disk space and permissions of audit.path.", "Drift: sjekk diskplass og rettigheter for audit.path."),
}

# Reasons made at run time from a pattern (the stage's name, an exception's class) or recorded
# without a problem answer.
PATTERNS: dict[str, Entry] = {
    "<filter>_timeout": ("filter_timeout", "The named stage (ingress, waf, tokens ...) did not answer in time.", "Det navngitte steget (ingress, waf, tokens ...) svarte ikke i tide.", "Operators: check that stage's dependency.", "Drift: sjekk stegets avhengighet."),
    "<filter>_error": ("internal_error", "The named stage raised an unexpected error (fail closed).", "Det navngitte steget kastet en uventet feil (fail closed).", "Operators: the log has the traceback under the request_id.", "Drift: loggen har stakksporet under request_id."),
    "body_read_failed:<error>": ("bad_request", "The request body could not be read (client closed, bad chunking).", "Forespørselskroppen kunne ikke leses (klienten lukket, feil chunking).", "Integrators: send the complete body.", "Integratører: send hele kroppen."),
    "client_disconnected": ("-", "The client went away before the answer (access log status 499); no problem was sent.", "Klienten forsvant før svaret (status 499 i tilgangsloggen); ingen problem ble sendt.", "Nothing, unless frequent: then check client timeouts.", "Ingenting, med mindre det er hyppig: sjekk da klientens tidsavbrudd."),
    "upstream_aborted": ("-", "The upstream broke off its response after the headers were sent to the client.", "Tjenesten avbrøt svaret etter at headerne var sendt til klienten.", "Operators: check the upstream's logs for the request_id.", "Drift: sjekk tjenestens logger for request_id."),
}

MISSING: Entry = ("?", "NOT DESCRIBED YET: add it to gateway/reasoncatalog.py.", "IKKE BESKREVET ENNÅ.", "", "")

MODULES = ("gateway.runtime", "gateway.audit", "gateway.auditsinks", "gateway.identity", "gateway.server", "gateway.admin")


def registered() -> dict[str, tuple[int, str]]:
    """The public reason registry with every module that registers loaded."""
    from gateway import problems

    runtime = importlib.import_module("gateway.runtime")
    for m in (*runtime.STAGE_MODULES, *MODULES):
        importlib.import_module(m)
    return dict(problems.REASONS)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    reg = registered()
    out = [
        "# Reason ids / Årsakskoder",
        "",
        "Generated from the reason registry (`gateway/problems.py`) and the catalogue",
        "(`gateway/reasoncatalog.py`) by `portvakt reasons > docs/reasons.md`; a test fails when they",
        "differ. A reason id is stable: it is the `reason` of the problem+json answer and the suffix of",
        "its `type` (`problems.type_base` + id; host this page there and the anchors below resolve),",
        "the `reason` label of `portvakt_filter_decisions_total` and the audit record's reason.",
        "",
        "Generert fra årsaksregisteret og katalogen. En årsakskode er stabil: den er `reason` i",
        "problem+json-svaret og slutten av `type`, etiketten `reason` i metrikkene og årsaken i",
        "revisjonsloggen.",
        "",
        "## Public reasons / Offentlige årsaker",
        "",
        "What the client receives. / Det klienten får.",
        "",
    ]
    for rid in sorted(reg, key=lambda r: (reg[r][0], r)):
        status, title = reg[rid]
        who, en, no, act_en, act_no = PUBLIC.get(rid, MISSING)
        out += [
            f"### `{rid}`",
            "",
            f"**{status}** {title}. Who acts / hvem handler: {who}.",
            "",
            f"- en: {en} *What to do:* {act_en}",
            f"- no: {no} *Hva gjøres:* {act_no}",
            "",
        ]
    out += [
        "## Internal reasons / Interne årsaker",
        "",
        "Only in the audit record, the access log and metrics; the client sees the public reason.",
        "Bare i revisjonsloggen, tilgangsloggen og metrikkene; klienten ser den offentlige årsaken.",
        "",
        "| internal id | client sees | en: meaning, what to do | no: betydning, hva gjøres |",
        "|---|---|---|---|",
    ]
    for rid, (public, en, no, act_en, act_no) in sorted({**INTERNAL, **PATTERNS}.items()):
        shown = f"`{public}` ({reg[public][0]})" if public in reg else "(no answer sent)"
        out.append(f"| `{rid}` | {shown} | {_cell(en)} {_cell(act_en)} | {_cell(no)} {_cell(act_no)} |")
    out.append("")
    return "\n".join(out)
