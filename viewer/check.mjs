// Opens one study in OHIF with headless Chromium (Playwright) and reports what OHIF shows of our
// results: `node viewer/check.mjs <request.json>`; prints one JSON report on stdout.
//
// request.json: {
//   "url": "http://127.0.0.1:PORT/viewer?StudyInstanceUIDs=...",  // the OHIF viewer route
//   "chromium": "/usr/bin/chromium",                               // Debian's chromium
//   "out": "folder for screenshots",
//   "steps": [ {"open": <SeriesNumber>, "nth": 0, "name": "02-text-sr",
//               "expect": "text" (then "text": what to wait for) | "seg" | "pmap" | "sr"}, ... ]
// }
// Each step double-clicks the study browser's thumbnail of that series into the active viewport
// (as a user does), waits for OHIF to settle, takes `<out>/<name>.png` (page) and
// `<out>/<name>-viewport.png` (the viewport alone), and records what OHIF's own services say
// (display sets, segmentations, viewport actors, measurements), the viewport's and the page's text,
// and for a SEG or a map where OHIF put its voxels.
// Every console message, page error, failed request and HTTP error is in the report; the pytest
// side (tests/test_viewer_ohif.py) decides what is an error. Run by `make viewer-test`.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const request = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const out = request.out;
fs.mkdirSync(out, { recursive: true });
const SETTLE_MS = request.settleMs ?? 4000;
const TIMEOUT_MS = request.timeoutMs ?? 90000;

// A locked-down, offline browser: no GPU (WebGL still runs, on SwiftShader, which Chromium picks by
// itself with --disable-gpu), no QUIC, no first-run or background traffic, and a profile folder of
// its own that is deleted afterwards.
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'hyperct-chromium-'));
const report = { url: request.url, flags: FLAGS, console: [], pageErrors: [], failedRequests: [],
                 httpErrors: [], steps: [], browser: null };

function now() { return new Date().toISOString(); }

let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: request.chromium,
    headless: true,
    chromiumSandbox: false,
    args: FLAGS,
    viewport: { width: 1600, height: 1000 },
  });
  report.browser = context.browser()?.version() ?? null;
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);
  let step = 'load';
  page.on('console', m => report.console.push({ step, type: m.type(), text: m.text(), location: m.location() }));
  page.on('pageerror', e => report.pageErrors.push({ step, text: String(e && (e.stack || e)) }));
  page.on('requestfailed', r => report.failedRequests.push({ step, url: r.url(), error: r.failure()?.errorText }));
  page.on('response', r => { if (r.status() >= 400) report.httpErrors.push({ step, url: r.url(), status: r.status() }); });

  // What OHIF's services say (the app puts them on window.services).
  const state = () => page.evaluate(() => {
    const s = window.services;
    if (!s) return null;
    const sets = s.displaySetService.getActiveDisplaySets().map(d => ({
      uid: d.displaySetInstanceUID, modality: d.Modality, seriesNumber: d.SeriesNumber,
      description: d.SeriesDescription, sopClassUID: d.SOPClassUID, unsupported: !!d.unsupported,
      isLoaded: d.isLoaded ?? d.loadStatus?.loaded ?? null, isHydrated: d.isHydrated ?? null,
      isRehydratable: d.isRehydratable ?? null,
      measurements: Array.isArray(d.measurements) ? d.measurements.map(m => ({
        trackingIdentifier: m.TrackingIdentifier, loaded: m.loaded, coords: (m.coords || []).length,
        labels: (m.labels || []).map(l => `${l.label}: ${l.value}`) })) : null,
    }));
    const segs = s.segmentationService.getSegmentations().map(g => ({
      id: g.segmentationId, label: g.label,
      segments: Object.values(g.segments || {}).filter(Boolean).map(x => ({ index: x.segmentIndex, label: x.label })),
    }));
    const vp = s.viewportGridService.getState();
    const active = vp.activeViewportId;
    const csvp = s.cornerstoneViewportService.getCornerstoneViewport(active);
    const reps = s.segmentationService.getSegmentationRepresentations(active) || [];
    return {
      displaySets: sets, segmentations: segs,
      activeViewport: {
        id: active, type: csvp?.type ?? null,
        displaySetUIDs: vp.viewports.get(active)?.displaySetInstanceUIDs ?? [],
        actors: csvp?.getActors ? csvp.getActors().map(a => a.referencedId || a.uid) : [],
        segmentationRepresentations: reps.map(r => ({ id: r.segmentationId, type: r.type, visible: r.visible })),
      },
      measurements: s.measurementService.getMeasurements().map(m => ({ label: m.label, displayText: m.displayText })),
    };
  });
  // Where OHIF put our voxels: per source CT instance (SOP Instance UID from the wadors imageId),
  // per segment, the voxel count and the sums of row and column indices of the SEG labelmap (all
  // layers: overlapping segments get one each); for a parametric map, the sum of its values and
  // their row/column moments per slice of OHIF's derived volume. The test compares them with what
  // the DICOM objects hold for the same instances (catches flips, shifts and slice mix-ups).
  const sopOf = imageId => (/\/instances\/([0-9.]+)/.exec(imageId || '') || [])[1] || imageId;
  const segStats = () => page.evaluate(() => {
    const cs = window.cornerstone;
    const out = {};
    for (const g of window.services.segmentationService.getSegmentations()) {
      const lm = g.representationData.Labelmap;
      for (const layer of Object.values(lm.labelmaps || { only: lm })) {
        const toSegment = layer.labelToSegmentIndex || null;
        for (const id of layer.imageIds) {
          const image = cs.cache.getImage(id);
          if (!image) continue;
          const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
          const cols = image.columns;
          for (let p = 0; p < data.length; p++) {
            const v = data[p];
            if (!v) continue;
            const seg = toSegment ? toSegment[v] : v;
            const key = `${image.referencedImageId}|${seg}`;
            const row = Math.floor(p / cols), col = p % cols;
            const acc = out[key] || (out[key] = [0, 0, 0]);
            acc[0] += 1; acc[1] += row; acc[2] += col;
          }
        }
      }
    }
    return out;
  }).then(raw => Object.entries(raw).map(([k, v]) => {
    const [imageId, seg] = k.split('|');
    return { sop: sopOf(imageId), segment: Number(seg), count: v[0], rowSum: v[1], colSum: v[2] };
  }));
  const pmapStats = uid => page.evaluate(uid => {
    const cs = window.cornerstone;
    const ds = window.services.displaySetService.getDisplaySetByUID(uid);
    const volume = cs.cache.getVolume(uid);
    if (!volume) return null;
    const ref = cs.cache.getVolume(ds.getReferencedVolumeId());
    const [cols, rows, slices] = volume.dimensions;
    const data = volume.voxelManager.getCompleteScalarDataArray();
    const perSlice = [];
    for (let k = 0; k < slices; k++) {
      let sum = 0, rowSum = 0, colSum = 0;
      for (let j = 0; j < rows; j++) {
        for (let i = 0; i < cols; i++) {
          const v = data[k * rows * cols + j * cols + i];
          sum += v; rowSum += v * j; colSum += v * i;
        }
      }
      perSlice.push({ imageId: ref.imageIds[k], sum, rowSum, colSum });
    }
    return { dimensions: volume.dimensions, voi: volume.metadata?.voiLut ?? null, perSlice };
  }, uid).then(r => r && { ...r, perSlice: r.perSlice.map(x => ({ ...x, sop: sopOf(x.imageId), imageId: undefined })) });
  const viewportText = () => page.evaluate(() =>
    document.querySelector('[data-cy="viewport-grid"]')?.innerText ?? '');
  const shoot = async name => {
    await page.screenshot({ path: path.join(out, `${name}.png`) });
    const grid = page.locator('[data-cy="viewport-pane"][data-is-active="true"]');
    if (await grid.count()) await grid.first().screenshot({ path: path.join(out, `${name}-viewport.png`) });
  };

  await page.goto(request.url);
  await page.waitForFunction(() => {
    const s = window.services;
    return s && s.displaySetService.getActiveDisplaySets().length > 0
      && document.querySelector('[data-cy="viewport-overlay-bottom-right"]')?.innerText.includes('I:');
  });
  await page.waitForTimeout(SETTLE_MS);
  report.steps.push({ name: '01-study', at: now(), state: await state(), viewportText: await viewportText(),
                      studyBrowser: await page.locator('[data-cy="study-browser-thumbnail-no-image"], [data-cy="study-browser-thumbnail"]').allInnerTexts() });
  await shoot('01-study');

  for (const s of request.steps) {
    step = s.name;
    const thumb = page.locator(`[data-series="${s.open}"]`).nth(s.nth ?? 0);
    await thumb.dblclick();
    const record = { name: s.name, open: s.open, nth: s.nth ?? 0, at: now(), notes: [] };
    if (s.expect === 'seg') {
      // OHIF previews a SEG and asks before it hydrates it into the viewport.
      const yes = page.getByRole('button', { name: 'Yes' });
      await yes.waitFor({ timeout: TIMEOUT_MS });
      record.prompt = await page.evaluate(() => document.querySelector('[data-cy="viewport-grid"]')?.innerText ?? '');
      await page.waitForTimeout(SETTLE_MS);
      await shoot(`${s.name}-preview`);
      await yes.click();
      await page.waitForFunction(() => window.services.segmentationService.getSegmentations().length > 0);
      // Show the segment list: the right panel's segmentation tab.
      const tab = page.locator('[data-cy="panelSegmentation-btn"], [data-cy="panelSegmentationWithTools-btn"]');
      if (await tab.count()) { await tab.first().click(); } else { record.notes.push('no segmentation panel button'); }
    } else if (s.expect === 'pmap') {
      await page.waitForFunction(n => window.services.displaySetService.getActiveDisplaySets()
        .filter(d => d.Modality === 'PMAP' && d.SeriesNumber == n).some(d => d.isLoaded), s.open)
        .catch(e => record.notes.push(`PMAP not loaded: ${e.message.split('\n')[0]}`));
    } else if (s.expect === 'text') {
      await page.waitForFunction(t => document.querySelector('[data-cy="viewport-grid"]')?.innerText.includes(t), s.text ?? '')
        .catch(e => record.notes.push(`text not shown: ${e.message.split('\n')[0]}`));
    }
    await page.waitForTimeout(SETTLE_MS);
    record.state = await state();
    if (s.expect === 'seg') record.segStats = await segStats();
    if (s.expect === 'pmap') {
      const pm = record.state?.displaySets.find(d => d.modality === 'PMAP' && d.isLoaded
        && record.state.activeViewport.displaySetUIDs.includes(d.uid));
      record.pmapStats = pm ? await pmapStats(pm.uid) : null;
    }
    record.viewportText = await viewportText();
    record.pageText = await page.evaluate(() => document.body.innerText);
    await shoot(s.name);
    report.steps.push(record);
  }
} catch (e) {
  report.fatal = String(e && (e.stack || e));
} finally {
  if (context) await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(report, null, 1) + '\n');
