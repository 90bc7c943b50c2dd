import EdgeHTTP

/// The web console's page, style and script, compiled into the broker: a
/// segregated network has no CDN, and nothing else is fetched (no fonts, no
/// images; the charts are SVG drawn by the script). The script reads the
/// token from the URL's fragment (`#token=…`, never sent to a server),
/// keeps it in the tab's session storage, removes it from the address bar,
/// and sends it in the `Authorization` header of each request. Everything
/// shown is set as text (never as HTML): names come from the IdPs.
enum ConsoleAssets {
    /// Every answer under `/console/` (files, errors, JSON): only its own
    /// files, no framing by another site, no referrer, no type sniffing.
    static func secured(_ response: HTTPResponse) -> HTTPResponse {
        var r = response
        r.headers.set(
            "Content-Security-Policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        r.headers.set("X-Frame-Options", "DENY")
        r.headers.set("X-Content-Type-Options", "nosniff")
        r.headers.set("Referrer-Policy", "no-referrer")
        return r
    }

    static func response(for request: HTTPRequest) -> HTTPResponse {
        guard request.method == "GET" || request.method == "HEAD" else {
            var r = HTTPResponse(status: 405, contentType: "text/plain; charset=utf-8", body: "the console's files take GET\n")
            r.headers.set("Allow", "GET, HEAD")
            return secured(r)
        }
        let file: (type: String, body: String)
        switch request.path {
        case "/console":
            var r = HTTPResponse(status: 301, contentType: "text/plain; charset=utf-8", body: "the console is at /console/\n")
            r.headers.set("Location", "/console/")
            return secured(r)
        case "/console/", "/console/index.html": file = ("text/html; charset=utf-8", page)
        case "/console/console.js": file = ("text/javascript; charset=utf-8", script)
        case "/console/console.css": file = ("text/css; charset=utf-8", style)
        default:
            // The path is not echoed: it is the caller's.
            return secured(
                HTTPResponse(status: 404, contentType: "text/plain; charset=utf-8", body: "no such file (the console is at /console/)\n"))
        }
        var r = HTTPResponse(status: 200, contentType: file.type, body: file.body)
        r.headers.set("Cache-Control", "no-cache")
        return secured(r)
    }

    static let page = #"""
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>scim-broker console</title>
        <link rel="stylesheet" href="console.css">
        </head>
        <body>
        <header>
          <h1>scim-broker <span class="muted">console</span></h1>
          <span id="version" class="muted"></span>
          <span id="role" class="badge"></span>
          <span id="updated" class="muted"></span>
          <button id="forget" type="button" hidden>Forget the token</button>
        </header>
        <div id="error" class="banner" hidden></div>
        <form id="login" hidden>
          <p>Give a token of the broker's read API to look, or an operator token (<code>api.operatorTokens</code>) to act too.
          It stays in this tab only. A link can carry it as <code>/console/#token=…</code>: the part after <code>#</code> never reaches a server.</p>
          <label>Token <input id="token" type="password" autocomplete="off" size="40"></label>
          <button type="submit">Open</button>
        </form>
        <main id="main" hidden>
          <section id="live">
            <h2>Live</h2>
            <div class="charts">
              <figure><figcaption>Changes per second: applied by the broker, delivered per target</figcaption>
                <svg id="rates" viewBox="0 0 560 170" role="img" aria-label="rates"></svg><div id="rates-legend" class="legend"></div></figure>
              <figure><figcaption>Latency from the agent's acceptance, seconds (last 10 s)</figcaption>
                <svg id="latency" viewBox="0 0 560 170" role="img" aria-label="latency"></svg><div id="latency-legend" class="legend"></div></figure>
            </div>
            <p id="totals" class="muted"></p>
          </section>
          <section id="federation">
            <h2>Federation</h2>
            <table id="domains"></table>
            <h3>Destinations <span class="muted">(boundaries fed by the downlink)</span></h3>
            <table id="destinations"></table>
          </section>
          <section id="targets">
            <h2>Targets</h2>
            <table id="target-table"></table>
            <div id="detail"></div>
          </section>
          <section id="log">
            <h2>Provisioning log</h2>
            <form id="search">
              <input id="q" type="search" size="60" placeholder="userName, externalId, email, displayName, any id or a trace id">
              <button type="submit">Search</button>
            </form>
            <div id="results"></div>
          </section>
        </main>
        <script src="console.js"></script>
        </body>
        </html>

        """#

    static let style = #"""
        :root { --fg: #1d2430; --muted: #6a7382; --line: #dfe3ea; --bg: #f6f7f9; --ok: #1f7a3f; --warn: #9a6200; --bad: #b3261e;
          --s0: #2563eb; --s1: #16a34a; --s2: #d97706; --s3: #9333ea; --s4: #dc2626; --s5: #0891b2; }
        * { box-sizing: border-box; }
        body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg); background: var(--bg); }
        header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1.2em; background: #fff; border-bottom: 1px solid var(--line); }
        h1 { font-size: 1.25em; margin: 0; } h2 { font-size: 1.1em; margin: 0 0 .5em; } h3 { font-size: 1em; margin: 1em 0 .4em; }
        main, #login { padding: 1em 1.2em; } section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .8em 1em; margin-bottom: 1em; }
        #forget { margin-left: auto; }
        .muted { color: var(--muted); font-weight: normal; }
        .banner { background: #fdecea; color: var(--bad); padding: .5em 1.2em; border-bottom: 1px solid #f3c1bc; }
        table { border-collapse: collapse; width: 100%; }
        th, td { text-align: left; padding: .3em .6em .3em 0; border-bottom: 1px solid var(--line); vertical-align: top; }
        th { font-weight: 600; color: var(--muted); font-size: .9em; }
        td.num { font-variant-numeric: tabular-nums; }
        .badge { display: inline-block; padding: 0 .5em; border-radius: 9px; font-size: .85em; background: #e8ebf0; }
        .ok { color: var(--ok); } .warn { color: var(--warn); } .bad { color: var(--bad); }
        .badge.ok { background: #e3f4e8; } .badge.warn { background: #fdf1dc; } .badge.bad { background: #fdecea; }
        button { font: inherit; padding: .1em .6em; margin: 0 .3em .2em 0; border: 1px solid #b9c0cc; border-radius: 4px; background: #fff; cursor: pointer; }
        button:hover { background: #eef1f5; } button.danger { border-color: #e3a49f; color: var(--bad); }
        button:disabled { opacity: .5; cursor: default; }
        input { font: inherit; padding: .15em .4em; border: 1px solid #b9c0cc; border-radius: 4px; }
        pre { white-space: pre-wrap; word-break: break-all; background: var(--bg); padding: .4em; margin: .2em 0; max-height: 16em; overflow: auto; }
        .charts { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; flex: 1 1 480px; } figcaption { color: var(--muted); font-size: .9em; }
        svg { width: 100%; height: auto; background: #fbfcfd; border: 1px solid var(--line); }
        svg .grid { stroke: var(--line); } svg text { font-size: 10px; fill: var(--muted); }
        svg polyline { fill: none; stroke-width: 1.8; }
        .s0 { stroke: var(--s0); color: var(--s0); } .s1 { stroke: var(--s1); color: var(--s1); } .s2 { stroke: var(--s2); color: var(--s2); }
        .s3 { stroke: var(--s3); color: var(--s3); } .s4 { stroke: var(--s4); color: var(--s4); } .s5 { stroke: var(--s5); color: var(--s5); }
        .legend span { margin-right: 1em; font-size: .9em; } .legend span::before { content: "\25A0 "; }
        #detail:not(:empty) { margin-top: .8em; padding-top: .6em; border-top: 2px solid var(--line); }
        .item { border-bottom: 1px solid var(--line); padding: .4em 0; }
        .steps { color: var(--muted); font-size: .9em; }
        #hops td:first-child { white-space: nowrap; }
        a { color: var(--s0); cursor: pointer; }

        """#

    static let script = #"""
        'use strict';
        (function () {
          const KEY = 'scim-broker-console-token';
          const $ = (s) => document.querySelector(s);
          let token = null, role = null, samples = [], overview = null, detail = null, polling = null, generation = 0;

          // Elements from data, always as text.
          function el(tag, attrs, ...children) {
            const e = document.createElement(tag);
            for (const [k, v] of Object.entries(attrs || {})) {
              if (v === undefined || v === null || v === false) continue;
              if (k === 'onclick' || k === 'onsubmit') e[k] = v; else if (k === 'class') e.className = v; else e.setAttribute(k, v === true ? '' : v);
            }
            for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
            return e;
          }
          function svg(tag, attrs) {
            const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
            for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
            return e;
          }
          function table(node, head, rows, empty) {
            node.replaceChildren(el('tr', {}, head.map((h) => el('th', {}, h))));
            if (!rows.length) node.append(el('tr', {}, el('td', { colspan: head.length, class: 'muted' }, empty)));
            for (const r of rows) node.append(el('tr', {}, r.map((c) => c instanceof Node && c.tagName === 'TD' ? c : el('td', {}, c))));
            return node;
          }
          const num = (v) => el('td', { class: 'num' }, v === null || v === undefined ? '-' : String(v));
          function iso(ms) { return ms ? new Date(ms).toISOString() : '-'; }
          function ago(ms) {
            if (!ms) return '-';
            const s = Math.round((Date.now() - ms) / 1000);
            const t = s < 90 ? s + ' s' : s < 5400 ? Math.round(s / 60) + ' min' : s < 172800 ? Math.round(s / 3600) + ' h' : Math.round(s / 86400) + ' days';
            return el('span', { title: iso(ms) }, s < 0 ? 'in ' + t.replace('-', '') : t + ' ago');
          }
          function until(seconds) {
            if (!seconds) return '-';
            const days = Math.floor((seconds * 1000 - Date.now()) / 86400000);
            return el('span', { title: iso(seconds * 1000), class: days < 0 ? 'bad' : days < 14 ? 'warn' : '' }, days < 0 ? 'expired' : 'in ' + days + ' days');
          }
          const badge = (text, kind) => el('span', { class: 'badge ' + (kind || '') }, text);
          // A count the broker takes at most every 30 s on a large store: '≥' when its walk stopped, and since when.
          function counted(o, name) {
            const v = o[name], at = o[name + 'CountedAt'];
            if (v === null || v === undefined) return '-';
            const text = (o[name + 'Complete'] === false ? '≥' : '') + v;
            return at && Date.now() - at > 10000 ? el('span', { title: 'counted ' + iso(at) }, text, ' ', el('span', { class: 'muted' }, 'as of ', ago(at))) : text;
          }

          async function api(path, body) {
            const init = { headers: { Authorization: 'Bearer ' + token }, cache: 'no-store' };
            if (body !== undefined) { init.method = 'POST'; init.headers['Content-Type'] = 'application/json'; init.body = JSON.stringify(body); }
            const r = await fetch('api/' + path, init);
            let j = null;
            try { j = await r.json(); } catch (e) { j = null; }
            if (r.status === 401) { signOut('the broker refused this token'); throw new Error('refused'); }
            if (!r.ok) throw new Error((j && j.detail) || 'HTTP ' + r.status);
            return j;
          }
          function problem(text) { const b = $('#error'); b.textContent = text || ''; b.hidden = !text; }
          const enc = encodeURIComponent;

          // Actions, by the operator's token only; one that cannot be undone asks for a second click.
          function action(label, run, danger, attrs) {
            const b = el('button', Object.assign({ type: 'button', class: danger ? 'danger' : '', disabled: role !== 'operator',
              title: role === 'operator' ? null : 'needs an operator token' }, attrs || {}), label);
            let armed = null;
            b.onclick = async () => {
              if (danger && !armed) { b.textContent = 'Click again: ' + label; armed = setTimeout(() => { armed = null; b.textContent = label; }, 5000); return; }
              clearTimeout(armed); armed = null; b.disabled = true;
              try { await run(); problem(''); } catch (e) { problem(label + ': ' + e.message); }
              b.disabled = false; b.textContent = label;
              await refresh();
              if (detail && detail.kind !== 'pause' && detail.kind !== 'push') renderDetail();
            };
            return b;
          }

          // MARK: federation and targets
          function renderFederation(o) {
            const f = o.federation;
            table($('#domains'), ['domain', 'agent (certificate identity)', 'connected', 'last seen', 'applied sequence', 'lag at its last batch', 'certificate', 'resources'],
              f.domains.map((d) => [
                el('td', {}, el('b', {}, d.domain), d.destinationOf.length ? el('div', { class: 'muted' }, 'destination of ' + d.destinationOf.join(', ')) : null),
                d.identity,
                d.connected ? badge('connected' + (d.connections > 1 ? ' ×' + d.connections : ''), 'ok') : badge('not connected', d.lastSeen ? 'warn' : ''),
                ago(d.lastSeen),
                el('td', { class: 'num' }, d.stores.length ? d.stores.map((s) => el('div', {}, String(s.applied) + (s.epoch ? ' ' : ''), s.epoch ? el('span', { class: 'muted' }, 'epoch ' + s.epoch) : null)) : '-'),
                el('td', { class: 'num' }, d.lagSeconds === null ? '-' : d.lagSeconds.toFixed(3) + ' s', d.lastBatch ? el('div', { class: 'muted' }, d.lastBatchEvents + ' events, ', ago(d.lastBatch)) : null),
                until(d.certificateExpiry),
                el('td', { class: 'num' }, counted(d, 'resources')),
              ]), 'no domain is bound');
            table($('#destinations'), ['target', 'domain', 'queued', 'oldest queued', 'feed issued / acknowledged', 'unacknowledged', 'oldest unacknowledged', 'agent'],
              f.destinations.map((d) => [d.target, d.domain, num(d.queued), ago(d.oldestQueuedAt), num(d.feed ? d.feed.issued + ' / ' + d.feed.acked : '-'),
                num(d.feed ? d.feed.unacked : '-'), ago(d.feed && d.feed.oldestUnackedAt), d.polling ? badge('polling', 'ok') : badge('not polling', 'warn')]),
              'no target is a boundary');
            $('#totals').textContent = 'Directory: ' + o.resources.User + ' users, ' + o.resources.Group + ' groups in ' + f.domains.length +
              ' domains; federation on ' + f.listen + ', ' + f.pendingBatches + ' batches waiting; broker up since ' + iso(o.startedAt);
          }

          function stateOf(t) {
            if (t.paused) return [badge('paused', 'warn'), el('div', { class: 'muted' }, t.paused.reason + ', ', ago(t.paused.since))];
            const s = t.state || '-';
            const kind = s === 'closed' ? 'ok' : s === 'discovering' || s === 'half-open' || s === 'deletes-paused' ? 'warn' : 'bad';
            const label = s === 'closed' ? 'ok' : s;
            const why = t.credentialsRefused ? t.credentialsRefused.reason : s !== 'closed' ? t.lastError : null;
            return [badge(label, kind), why ? el('div', { class: 'muted' }, why) : null];
          }

          function rateOf(name) {
            if (samples.length < 2) return '-';
            const a = samples[samples.length - 2], b = samples[samples.length - 1];
            const ta = a.targets.find((t) => t.target === name), tb = b.targets.find((t) => t.target === name);
            if (!ta || !tb || b.at <= a.at) return '-';
            return (Math.max(0, tb.delivered - ta.delivered) * 1000 / (b.at - a.at)).toFixed(1) + '/s';
          }

          function renderTargets(o) {
            table($('#target-table'), ['target', 'state', 'breaker', 'queued', 'oldest queued', 'rate', 'delivered', 'dead letters', 'held removals', ''],
              o.targets.map((t) => [
                el('td', {}, el('b', {}, t.target), el('div', { class: 'muted' }, t.url || '')),
                el('td', {}, stateOf(t)), t.breaker || '-', num(t.queued), ago(t.queued ? t.oldestQueuedAt : 0), num(rateOf(t.target)), num(t.delivered),
                el('td', { class: 'num' }, el('a', { onclick: () => openDetail('deadletters', t.target) }, counted(t, 'deadLetters'))),
                el('td', { class: 'num' }, el('a', { onclick: () => openDetail('held', t.target) }, counted(t, 'held')), t.heldSince ? el('div', { class: 'warn' }, 'guard tripped ', ago(t.heldSince)) : null),
                el('td', {},
                  t.paused ? action('Resume', () => api('targets/' + enc(t.target) + '/resume', {}), false, { 'data-action': 'resume', 'data-target': t.target })
                    : el('button', { type: 'button', 'data-action': 'pause', 'data-target': t.target, disabled: role !== 'operator', onclick: () => openDetail('pause', t.target) }, 'Pause…'),
                  el('button', { type: 'button', 'data-action': 'push', 'data-target': t.target, onclick: () => openDetail('push', t.target) }, 'Push…')),
              ]), 'no target is configured');
            o.targets.forEach((t, i) => $('#target-table').rows[i + 1].setAttribute('data-target', t.target));
          }

          // MARK: a target's detail: dead letters, held removals, pause, push
          async function openDetail(kind, target) { detail = { kind, target }; await renderDetail(); }
          async function renderDetail() {
            const box = $('#detail');
            if (!detail) { box.replaceChildren(); return; }
            const { kind, target } = detail, path = 'targets/' + enc(target) + '/';
            const close = el('button', { type: 'button', onclick: () => { detail = null; box.replaceChildren(); } }, 'Close');
            try {
              if (kind === 'deadletters') {
                const d = await api(path + 'deadletters');
                // "all" is what this list counted: up to its highest number (409 when more came since).
                box.replaceChildren(el('h3', {}, 'Dead letters of ' + target + ' ', el('span', { class: 'muted' }, '(' + d.total + (d.letters.length < d.total ? ', the oldest ' + d.letters.length + ' shown' : '') + ')')),
                  d.letters.length ? el('div', {}, action('Retry all ' + d.total, () => api(path + 'deadletters/retry', { through: d.lastSeq })), action('Drop all ' + d.total, () => api(path + 'deadletters/drop', { through: d.lastSeq }), true)) : el('p', { class: 'muted' }, 'none'),
                  d.letters.map((l) => el('div', { class: 'item', 'data-seq': l.seq },
                    el('div', {}, el('b', {}, '#' + l.seq), ' ', iso(l.at), ' ', (l.method || '') + ' ' + (l.path || '') + ' → ' + l.status, ' ', el('span', { class: 'muted' }, (l.type || '') + ' ' + l.id + ', trace '),
                      el('a', { onclick: () => search(l.trace) }, l.trace || '-')),
                    el('details', {}, el('summary', {}, 'request and response'), ['request', 'response'].map((f) => [el('div', { class: 'muted' }, f,
                      (l.truncated || []).includes(f) ? ' (the first 16 KiB of ' + l[f + 'Bytes'] + ' bytes: scim-broker deadletter list shows it whole)' : ''), el('pre', {}, l[f] || '')])),
                    action('Retry', () => api(path + 'deadletters/retry', { seq: l.seq })), action('Drop', () => api(path + 'deadletters/drop', { seq: l.seq }), true))),
                  close);
              } else if (kind === 'held') {
                const h = await api(path + 'held');
                const n = (h.complete ? '' : '≥') + h.total;
                box.replaceChildren(el('h3', {}, 'Removals held by the deletion guard of ' + target + ' ', el('span', { class: 'muted' }, '(' + n + (h.removals.length < h.total ? ', the first ' + h.removals.length + ' shown' : '') + ')')),
                  h.complete ? null : el('p', { class: 'warn' }, 'The queue is longer than the console reads (' + h.scanned + ' entries): use scim-broker targets held and confirm-deletes.'),
                  h.pausedSince ? el('div', {}, el('p', {}, 'The guard tripped ', ago(h.pausedSince), ': removals wait for a decision. Confirming sends them; rejecting drops them (the accounts stay).'),
                    action('Confirm: send these ' + n, () => api(path + 'held/confirm', { through: h.lastSeq }), true), action('Reject these ' + n, () => api(path + 'held/reject', { through: h.lastSeq }), true)) : el('p', { class: 'muted' }, 'the deletion guard holds nothing: removals flow'),
                  table(el('table'), ['#', 'removal', 'name', 'domain', 'queued', 'trace', ''], h.removals.map((r) => ['#' + r.seq, r.op + ' ' + r.type + ' ' + r.id, r.userName || r.displayName || '-', r.domain || '-', ago(r.queuedAt),
                    el('a', { onclick: () => search(r.trace) }, r.trace || '-'), action('Reject', () => api(path + 'held/reject', { seqs: [r.seq] }), true)]), 'nothing held'),
                  close);
              } else if (kind === 'pause') {
                const reason = el('input', { id: 'pause-reason', size: 40, value: 'paused from the console' });
                box.replaceChildren(el('h3', {}, 'Pause ' + target),
                  el('p', {}, 'Nothing is sent to ' + target + ' until it is resumed; its queue is kept and keeps growing. The pause survives a restart.'),
                  el('label', {}, 'Reason ', reason), ' ',
                  el('button', { type: 'button', id: 'pause-now', 'data-target': target, disabled: role !== 'operator', onclick: async () => {
                    try { await api(path + 'pause', { reason: reason.value }); problem(''); detail = null; box.replaceChildren(); } catch (e) { problem('pause: ' + e.message); }
                    refresh();
                  } }, 'Pause now'), close);
              } else if (kind === 'push') {
                const what = el('input', { id: 'push-resource', size: 40, placeholder: 'userName, externalId, displayName or any id' });
                const out = el('div', { id: 'push-result' });
                box.replaceChildren(el('h3', {}, 'Provision on demand to ' + target),
                  el('p', {}, 'Sends one resource now, whole, and shows the target\'s answer to each request.'),
                  what, ' ', el('button', { type: 'button', id: 'push-now', disabled: role !== 'operator', onclick: () => push(path, what.value, out) }, 'Push now'), close, out);
              }
            } catch (e) { box.replaceChildren(el('p', { class: 'bad' }, e.message), close); }
          }

          async function push(path, resource, out) {
            out.replaceChildren(el('p', { class: 'muted' }, 'pushing…'));
            try {
              const p = await api(path + 'push', { resource });
              const head = el('p', {}, p.type + ' ' + p.id + ' (' + p.name + ', domain ' + p.domain + '): ');
              if (!p.inScope) { head.append(el('span', { class: 'warn' }, 'out of scope: the routes do not want it; nothing is sent')); out.replaceChildren(head); return; }
              head.append(p.account ? 'sent again, whole, to account ' + p.account : 'no account there yet: created', '; trace ', el('a', { onclick: () => search(p.trace) }, p.trace));
              if (p.paused) head.append(el('span', { class: 'warn' }, ' (the target is paused: it waits for the resume)'));
              out.replaceChildren(head);
              for (let i = 0; i < 60; i++) {
                const a = await api(path + 'push?id=' + enc(p.id) + '&since=' + p.queuedAt);
                if (a.done) {
                  for (const s of a.hop.steps || []) out.append(el('div', { class: 'steps' }, s.method + ' ' + s.path + ' → ' + (s.status !== undefined ? s.status : 'no answer: ' + (s.error || ''))));
                  out.append(el('p', { class: a.delivered ? 'ok' : 'bad' }, a.delivered ? 'delivered' : 'refused: a dead letter', a.hop.status ? ' (' + a.hop.status + ')' : ''));
                  return;
                }
                await new Promise((r) => setTimeout(r, 500));
              }
              out.append(el('p', { class: 'warn' }, 'no answer yet: it stays queued'));
            } catch (e) { out.replaceChildren(el('p', { class: 'bad' }, e.message)); }
          }

          // MARK: provisioning log
          function outcome(h, earlier) {
            if (h.hop === 'agent accept') return ['accepted by the agent', 'ok'];
            if (h.hop === 'broker apply') return ['relayed and applied by the broker', 'ok'];
            if (h.event === 'out of scope') return ['out of scope', 'muted'];
            if (h.heldSince) return ['held by the deletion guard', 'warn'];
            if (h.detail === 'dead letter') return ['dead-lettered', 'bad'];
            if ((h.detail || '').startsWith('rejected')) return ['rejected by an operator', 'warn'];
            if (h.detail === 'nothing to send') return ['up to date: nothing to send', 'muted'];
            const t = h.trace || '';
            if (t.startsWith('reconcile-')) return ['fixed by reconcile', 'ok'];
            if (t.startsWith('push-')) return ['pushed on demand', 'ok'];
            if (earlier.some((e) => e.id === h.id && e.hop === h.hop && e.detail === 'dead letter')) return ['delivered on retry', 'ok'];
            return [h.event === 'remove' ? 'removed' : h.event === 'deactivate' ? 'deactivated' : 'delivered', 'ok'];
          }
          async function search(q) {
            if (!q) return;
            $('#q').value = q;
            const box = $('#results');
            box.replaceChildren(el('p', { class: 'muted' }, 'searching…'));
            try {
              const r = await api('trace?q=' + enc(q));
              if (!r.hops.length) { box.replaceChildren(el('p', { class: 'muted' }, r.notFound || 'nothing recorded for ' + q)); return; }
              const names = {};
              for (const x of r.resources) names[x.id] = x;
              const rows = r.hops.map((h, i) => {
                const [what, kind] = outcome(h, r.hops.slice(0, i));
                const res = names[h.id] || {};
                const info = [h.method && h.status !== undefined && !(h.steps || []).length ? h.method + ' → ' + h.status : null, h.detail && h.detail !== 'dead letter' ? h.detail : null,
                  h.domain ? 'domain ' + h.domain : null, h.seq ? 'sequence ' + h.seq : null].filter(Boolean).join('; ');
                return [el('span', { title: iso(h.at) }, iso(h.at)), el('td', {}, res.name || h.id, el('div', { class: 'muted' }, (res.type || '') + ' ' + h.id)),
                  h.hop, el('td', { class: kind }, what), el('td', {}, info, (h.steps || []).map((s) => el('div', { class: 'steps' }, s.method + ' ' + s.path + ' → ' + (s.status !== undefined ? s.status : 'no answer')))),
                  el('a', { onclick: () => search(h.trace) }, h.trace || '-')];
              });
              const t = el('table', { id: 'hops' });
              table(t, ['time (UTC)', 'resource', 'hop', 'outcome', 'detail', 'trace'], rows, '');
              const more = r.complete ? '' : 'at least ';
              box.replaceChildren(el('p', { class: 'muted' }, more + r.total + ' hops of ' + (r.resourcesTotal > r.resources.length ? more + r.resourcesTotal + ' resources, among them ' : '') +
                r.resources.map((x) => (x.type || '') + ' ' + (x.name || x.id) + (x.domain ? ' (' + x.domain + ')' : '')).join(', ') + (r.total > r.hops.length ? '; the earliest ' + r.hops.length + ' shown' : '') +
                (r.complete ? '' : '; the console reads ' + r.resourcesRead + ' resources of a trace: scim-broker trace --limit N shows more')), t);
            } catch (e) { box.replaceChildren(el('p', { class: 'bad' }, e.message)); }
          }

          // MARK: charts, from the differences between polls
          function chart(node, legend, series, unit) {
            const W = 560, H = 170, L = 44, B = 18, T = 8;
            const n = samples.length, all = series.flatMap((s) => s.values).filter((v) => v !== null);
            const max = Math.max(unit === 's' ? 0.01 : 1, ...all) * 1.1;
            node.replaceChildren();
            for (let i = 0; i <= 4; i++) {
              const y = T + (H - T - B) * i / 4;
              node.append(svg('line', { x1: L, x2: W - 4, y1: y, y2: y, class: 'grid' }));
              const t = svg('text', { x: 2, y: y + 3 }); t.textContent = (max * (4 - i) / 4).toFixed(unit === 's' ? 3 : 1); node.append(t);
            }
            const span = n > 1 ? (samples[n - 1].at - samples[0].at) / 1000 : 0;
            const label = svg('text', { x: L, y: H - 4 }); label.textContent = n > 1 ? 'last ' + Math.round(span) + ' s' : 'collecting…'; node.append(label);
            legend.replaceChildren();
            series.forEach((s, k) => {
              const pts = s.values.map((v, i) => v === null ? null : (L + (W - 4 - L) * i / Math.max(1, n - 1)).toFixed(1) + ',' + (T + (H - T - B) * (1 - v / max)).toFixed(1)).filter(Boolean);
              if (pts.length > 1) node.append(svg('polyline', { points: pts.join(' '), class: 's' + (k % 6) }));
              const last = s.values.filter((v) => v !== null).pop();
              legend.append(el('span', { class: 's' + (k % 6) }, s.name + (last !== undefined ? ' ' + last.toFixed(unit === 's' ? 3 : 1) + (unit === 's' ? ' s' : '/s') : '')));
            });
          }
          function rates(pick) {
            return samples.map((b, i) => {
              if (i === 0) return null;
              const a = samples[i - 1], x = pick(a), y = pick(b);
              return x === undefined || y === undefined || b.at <= a.at ? null : Math.max(0, y - x) * 1000 / (b.at - a.at);
            });
          }
          function renderCharts() {
            const names = samples.length ? samples[samples.length - 1].targets.map((t) => t.target) : [];
            chart($('#rates'), $('#rates-legend'), [{ name: 'applied', values: rates((m) => m.eventsApplied) }].concat(
              names.map((n) => ({ name: n, values: rates((m) => (m.targets.find((t) => t.target === n) || {}).delivered) }))), '/s');
            const lat = (f) => samples.map((m) => f(m) || null);
            chart($('#latency'), $('#latency-legend'), [{ name: 'broker p50', values: lat((m) => m.propagation.count ? m.propagation.p50 : null) },
              { name: 'broker p99', values: lat((m) => m.propagation.count ? m.propagation.p99 : null) }].concat(
              names.map((n) => ({ name: n + ' p99', values: lat((m) => { const t = m.targets.find((x) => x.target === n); return t && t.latency.count ? t.latency.p99 : null; }) }))), 's');
          }

          // MARK: polling
          async function refresh() {
            try {
              const [o, m] = await Promise.all([api('overview'), api('metrics')]);
              overview = o;
              samples.push(m);
              if (samples.length > 90) samples.shift();
              renderFederation(o); renderTargets(o); renderCharts();
              $('#version').textContent = o.version;
              $('#updated').textContent = 'updated ' + new Date().toISOString().slice(11, 19) + ' UTC';
              problem('');
              document.body.dataset.loaded = 'true';
              document.body.dataset.samples = String(samples.length);
            } catch (e) { if (token) problem('cannot reach the broker: ' + e.message); }
          }
          async function start() {
            try {
              const s = await api('session');
              role = s.role;
              $('#role').textContent = role === 'operator' ? 'operator: may act' : 'read-only';
              $('#role').className = 'badge ' + (role === 'operator' ? 'warn' : '');
            } catch (e) { if (token) problem(e.message); return; }
            $('#login').hidden = true; $('#main').hidden = false; $('#forget').hidden = false;
            // The next poll 2 s after the last one answered: a slow broker gets fewer requests, never a pile.
            const mine = ++generation;
            clearTimeout(polling);
            const poll = async () => { await refresh(); if (token && mine === generation) polling = setTimeout(poll, 2000); };
            await poll();
          }
          function signOut(why) {
            sessionStorage.removeItem(KEY); token = null; generation++; clearTimeout(polling);
            $('#main').hidden = true; $('#forget').hidden = true; $('#login').hidden = false; $('#role').textContent = '';
            problem(why || '');
          }

          const fragment = new URLSearchParams(location.hash.slice(1));
          if (fragment.get('token')) {
            sessionStorage.setItem(KEY, fragment.get('token'));
            history.replaceState(null, '', location.pathname + location.search);
          }
          token = sessionStorage.getItem(KEY);
          $('#login').onsubmit = (e) => { e.preventDefault(); token = $('#token').value.trim(); if (token) { sessionStorage.setItem(KEY, token); start(); } };
          $('#forget').onclick = () => signOut('');
          $('#search').onsubmit = (e) => { e.preventDefault(); search($('#q').value.trim()); };
          if (token) start(); else $('#login').hidden = false;
        })();

        """#
}
