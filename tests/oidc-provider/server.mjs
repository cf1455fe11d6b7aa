// A protocol-conformant OpenID Provider for Portvakt's persons' login tests: panva/oidc-provider
// (pinned in package-lock.json), started by tests/fixtures/oidc_provider.py on 127.0.0.1.
// Config JSON (argv[2]): {port, issuer, clients: [...], accessTtl, jwks: {keys: [private RSA JWK]}}.
// The login page is ours (a tester picks the level, like TestID); consent is granted up front.
// Prints "ready <port>" on stdout once listening.
import http from 'node:http';
import fs from 'node:fs';
import querystring from 'node:querystring';
import Provider from 'oidc-provider';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const ACR = ['idporten-loa-substantial', 'idporten-loa-high'];

const provider = new Provider(cfg.issuer, {
  clients: cfg.clients,
  jwks: cfg.jwks,
  cookies: { keys: ['portvakt-test-cookie-key-not-secret'] },
  pkce: { required: () => true },
  acrValues: ACR,
  claims: { openid: ['sub'], profile: ['pid', 'locale'] },
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    pushedAuthorizationRequests: { enabled: true },
    rpInitiatedLogout: {
      enabled: true,
      logoutSource: async (ctx, form) => {
        ctx.body = `<!doctype html><html><body><h1>Sign out?</h1>${form}` +
          '<button id="logout-yes" type="submit" form="op.logoutForm" value="yes" name="logout">Yes</button></body></html>';
      },
    },
    revocation: { enabled: true },
  },
  ttl: { AccessToken: cfg.accessTtl || 120, IdToken: 600, RefreshToken: 600, Session: 7200, Grant: 7200, Interaction: 600 },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  findAccount: async (ctx, id) => ({
    accountId: id,
    async claims() { return { sub: id, pid: id, locale: 'nb' }; },
  }),
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid profile');
    grant.addOIDCClaims(['pid', 'locale']);
    await grant.save();
    return grant;
  },
  renderError: async (ctx, out) => { ctx.type = 'text/plain'; ctx.body = `error: ${out.error}`; },
});
provider.proxy = false;

const counters = { refresh: 0, code: 0 };
provider.on('grant.success', (ctx) => {
  const gt = ctx.oidc.params.grant_type;
  if (gt === 'refresh_token') counters.refresh += 1;
  if (gt === 'authorization_code') counters.code += 1;
});

const callback = provider.callback();

function page(res, body) {
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(`<!doctype html><html><body>${body}</body></html>`);
}

const server = http.createServer(async (req, res) => {
  try {
    if (req.url === '/_counters') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(counters));
      return;
    }
    if (req.url.startsWith('/interaction/')) {
      const details = await provider.interactionDetails(req, res);
      if (req.method === 'GET') {
        const want = (details.params.acr_values || ACR[0]).split(' ')[0];
        const radios = ACR.map((a) => `<label><input type="radio" name="acr" id="acr-${a.split('-').pop()}" value="${a}"${a === want ? ' checked' : ''}>${a}</label>`).join('<br>');
        page(res, `<h1>oidc-provider login</h1><form method="post" action="${req.url}">` +
          `<input id="pid" name="pid" value="24917397852"><br>${radios}<br><button id="login">Log in</button></form>`);
        return;
      }
      let raw = '';
      for await (const chunk of req) raw += chunk;
      const form = querystring.parse(raw);
      const result = { login: { accountId: String(form.pid || '24917397852'), acr: String(form.acr || ACR[0]), amr: ['TestID'] } };
      await provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });
      return;
    }
    callback(req, res);
  } catch (err) {
    res.writeHead(500, { 'content-type': 'text/plain' });
    res.end(`error: ${err.message}`);
  }
});
server.listen(cfg.port, '127.0.0.1', () => { process.stdout.write(`ready ${cfg.port}\n`); });
