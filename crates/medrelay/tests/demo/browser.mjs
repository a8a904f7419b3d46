// Drives medrelay's demo page in a real browser (Debian's chromium, headless, through
// playwright-core) as a person would, for tests/it/demo.rs. Prints one JSON line of what the page
// showed; exits 1 with the error when a step fails.
//
// Usage: MEDRELAY_BROWSER_TOOLS=<node_modules> node browser.mjs URL PDF PHOTO UNSUPPORTED SCREENSHOT
import { createRequire } from 'node:module'

const [url, pdf, photo, unsupported, screenshot] = process.argv.slice(2)
const require = createRequire(process.env.MEDRELAY_BROWSER_TOOLS + '/')
const { chromium } = require('playwright-core')

const browser = await chromium.launch({
  executablePath: process.env.MEDRELAY_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu'],
})
const out = { console_errors: [], requests_elsewhere: [] }
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 1400 } })
  page.on('console', (m) => { if (m.type() === 'error') out.console_errors.push(m.text()) })
  page.on('request', (r) => { if (!r.url().startsWith(new URL(url).origin)) out.requests_elsewhere.push(r.url()) })
  await page.goto(url)
  out.notice = await page.textContent('#notice')

  // Development sign-in.
  await page.waitForSelector('#dev-signin:not([hidden])', { timeout: 10000 })
  await page.fill('#user', 'browser')
  await page.click('#signin-button')
  await page.waitForSelector('#upload:not([hidden])')

  const rows = (table) => page.$$eval(`#${table} tbody tr`, (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)))
  const sendAndWait = async (file) => {
    await page.setInputFiles('#file', file)
    await page.waitForFunction(() => ['succeeded', 'failed'].includes(document.querySelector('#status').dataset.status), null, { timeout: 60000 })
    return page.$eval('#status', (e) => e.dataset.status)
  }

  // A real PDF: the status reaches succeeded and the result is rendered for a person.
  out.pdf = { status: await sendAndWait(pdf) }
  out.pdf.type = await page.textContent('#doc-type')
  out.pdf.summary = await page.textContent('#doc-summary')
  out.pdf.medications = await rows('medications')
  out.pdf.labs = await rows('labs')
  out.pdf.diagnoses = await rows('diagnoses')
  out.pdf.expires = await page.textContent('#expires')
  await page.screenshot({ path: screenshot, fullPage: true })

  // Delete now: the page says so.
  await page.click('#delete')
  await page.waitForSelector('#deleted:not([hidden])')
  out.deleted = await page.$eval('#status', (e) => e.dataset.status)

  // A photo.
  out.photo = { status: await sendAndWait(photo) }
  out.photo.type = await page.textContent('#doc-type')

  // A file the service does not take: the friendly message.
  await page.setInputFiles('#file', unsupported)
  await page.waitForSelector('#upload-error:not([hidden])', { timeout: 20000 })
  out.unsupported = await page.textContent('#upload-error')
  console.log(JSON.stringify(out))
} catch (e) {
  console.error(e)
  process.exitCode = 1
} finally {
  await browser.close()
}
