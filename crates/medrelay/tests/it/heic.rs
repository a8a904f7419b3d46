//! HEIC photos (an iPhone's default), every file made here by `heif-enc` from the suite's own
//! JPEGs: recognised from their bytes, accepted by both upload routes, decoded in the sandbox
//! (the primary image only, turned upright as `irot`/`imir` say, metadata dropped), sent to
//! Claude as a JPEG within its limits; a damaged file is unreadable and a bomb too complex;
//! switched off, and for AVIF, a 415 with advice.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use serde_json::Value;

use crate::claude::claude_app;
use crate::claude_mock::{Mock, Reply, extraction};
use crate::fixtures::{GPS_CANARY, exif_with_gps, heif_enc, heif_with_transforms, record_jpeg};
use crate::harness::{Backend, TestApp, assert_problem};
use crate::tus::{create, header, patch};

on_every_backend!(heic_photos_come_in_through_both_routes_and_report_their_size,);

/// Which corner of `image` holds the red mark: (at the right, at the bottom).
fn red_corner(image: &image::RgbImage) -> (bool, bool) {
    let (w, h) = image.dimensions();
    let red = |x: u32, y: u32| {
        let p = image.get_pixel(x, y);
        p[0] > 150 && p[1] < 100 && p[2] < 100
    };
    let corners: Vec<(bool, bool)> = [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .filter(|(right, bottom)| {
            let x = if *right { w - 1 - w / 20 } else { w / 20 };
            let y = if *bottom { h - 1 - h / 20 } else { h / 20 };
            red(x, y)
        })
        .collect();
    assert_eq!(corners.len(), 1, "one red corner: {corners:?}");
    corners[0]
}

/// The job of a tus upload of `bytes`, sent in two requests.
async fn tus_upload(app: &TestApp, token: &str, bytes: &[u8]) -> String {
    let path = create(app, token, bytes.len()).await;
    let half = bytes.len() / 2;
    let r = patch(app, token, &path, 0, &bytes[..half]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = patch(app, token, &path, half, &bytes[half..]).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let job = header(&r, "medrelay-job");
    job.trim_start_matches("/v1/jobs/").to_owned()
}

/// The job of a `POST /v1/documents` of `bytes`, once it has ended.
async fn finished(app: &TestApp, token: &str, bytes: Vec<u8>) -> Value {
    let job = app.upload_ok(token, bytes, "image/heic").await;
    app.wait_terminal(token, job["id"].as_str().unwrap()).await
}

async fn heic_photos_come_in_through_both_routes_and_report_their_size(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("iphone");
    let photo = heif_enc(&[&record_jpeg(1200, 1600, None)], &[]);
    assert_eq!(&photo[4..12], b"ftypheic");

    let job = app
        .upload_ok(&token, photo.clone(), "application/octet-stream")
        .await;
    assert_eq!(job["media_type"], "image/heic");
    let by_post = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    let id = tus_upload(&app, &token, &photo).await;
    let by_tus = app.wait_terminal(&token, &id).await;
    for done in [&by_post, &by_tus] {
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["media_type"], "image/heic");
        let document = &done["result"]["document"];
        assert_eq!(document["media_type"], "image/heic");
        assert_eq!(
            (&document["pixel_width"], &document["pixel_height"]),
            (&Value::from(1200), &Value::from(1600))
        );
    }

    // A grid of 512 x 512 tiles, as an iPhone stores its photos (heifer's encoder: libheif
    // 1.15's heif-enc writes one picture), turned a quarter: the upright size.
    let rgba = record_jpeg(2048, 1536, None);
    let rgba = image::load_from_memory(&rgba).unwrap().to_rgba8();
    let options = heifer::EncodeOptions {
        quality: 50,
        max_threads: 2,
    };
    let grid = heifer::encode_rgba8(2048, 1536, rgba.as_raw(), &options).unwrap();
    let done = finished(&app, &token, heif_with_transforms(&grid, 1, None)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let document = &done["result"]["document"];
    assert_eq!(
        (&document["pixel_width"], &document["pixel_height"]),
        (&Value::from(1536), &Value::from(2048))
    );

    // Two images with thumbnails (a burst): only the primary, the first, is read.
    let burst = heif_enc(
        &[&record_jpeg(300, 200, None), &record_jpeg(640, 480, None)],
        &["-t", "64"],
    );
    let done = finished(&app, &token, burst).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let document = &done["result"]["document"];
    assert_eq!(
        (&document["pixel_width"], &document["pixel_height"]),
        (&Value::from(300), &Value::from(200))
    );

    // A photo cut short in its image data: unreadable, not retried.
    let mut truncated = photo.clone();
    truncated.truncate(photo.len() * 2 / 3);
    let done = finished(&app, &token, truncated).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "document-unreadable");
    assert_eq!(done["error"]["retryable"], false);
    app.assert_store_empties().await;
    app.stop().await;
}

/// The image Claude was sent in `call`, checked to be a JPEG within Claude's limits and
/// without any metadata.
fn sent_image(call: &Value) -> image::RgbImage {
    let block = &call["messages"][0]["content"][0];
    assert_eq!(block["type"], "image");
    assert_eq!(block["source"]["media_type"], "image/jpeg");
    let data = block["source"]["data"].as_str().unwrap();
    assert!(data.len() < 5 * 1024 * 1024, "{} base64 bytes", data.len());
    let jpeg = STANDARD.decode(data).unwrap();
    assert!(jpeg.starts_with(&[0xff, 0xd8, 0xff]));
    assert!(!jpeg.windows(4).any(|w| w == b"Exif"), "no EXIF block");
    assert!(!jpeg.windows(GPS_CANARY.len()).any(|w| w == GPS_CANARY));
    let image = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).unwrap();
    assert!(image.width().max(image.height()) <= 1568);
    image.to_rgb8()
}

/// What libheif (`heif-convert`, the reference decoder) makes of `heif`.
fn libheif_decode(heif: &[u8]) -> image::RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.heic"), dir.path().join("out.png"));
    std::fs::write(&input, heif).unwrap();
    let done = std::process::Command::new("heif-convert")
        .arg(&input)
        .arg(&output)
        .output()
        .expect("heif-convert (Debian's libheif-examples; scripts/test installs it)");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    image::open(output).unwrap().to_rgb8()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heic_photos_reach_claude_upright_as_jpeg_within_its_limits_and_without_metadata() {
    let replies = (0..3)
        .map(|_| Reply::ok(extraction("photo text")))
        .collect();
    let (mock, base) = Mock::start(replies, None).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("iphone");

    // A 27-megapixel photo: scaled to 1568 px on its long edge.
    let big = heif_enc(&[&record_jpeg(6000, 4500, None)], &[]);
    let done = finished(&app, &token, big).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let sent = sent_image(&mock.calls().last().unwrap().body);
    assert_eq!(sent.dimensions(), (1568, 1176));
    assert_eq!(red_corner(&sent), (false, false), "upright as it was");

    // With GPS in its EXIF: the position never leaves.
    let located = heif_enc(&[&record_jpeg(800, 600, Some(exif_with_gps(1)))], &[]);
    assert!(
        located.windows(GPS_CANARY.len()).any(|w| w == GPS_CANARY),
        "heif-enc kept the EXIF"
    );
    let done = finished(&app, &token, located).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let sent = sent_image(&mock.calls().last().unwrap().body);
    assert_eq!(sent.dimensions(), (800, 600));

    // An EXIF orientation inside a HEIF file is not applied (the HEIF rule; libheif agrees).
    let exif_turned = heif_enc(&[&record_jpeg(800, 600, Some(exif_with_gps(6)))], &[]);
    assert_eq!(red_corner(&libheif_decode(&exif_turned)), (false, false));
    let done = finished(&app, &token, exif_turned).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let sent = sent_image(&mock.calls().last().unwrap().body);
    assert_eq!(
        (sent.dimensions(), red_corner(&sent)),
        ((800, 600), (false, false))
    );

    assert_eq!(mock.calls().len(), 3);
    app.assert_store_empties().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heic_photos_are_turned_and_mirrored_as_libheif_shows_them() {
    let (mock, base) = Mock::start(Vec::new(), Some(Reply::ok(extraction("photo text")))).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("iphone");
    // Turned by quarters anticlockwise (`irot`), then mirrored (`imir`): shown as libheif
    // shows them, the red mark no longer at the top left.
    let plain = heif_enc(&[&record_jpeg(800, 600, None)], &[]);
    for (turns, mirror, size, corner) in [
        (0, Some(0), (800, 600), (false, true)),
        (1, None, (600, 800), (false, true)),
        (3, None, (600, 800), (true, false)),
        (1, Some(1), (600, 800), (true, true)),
    ] {
        let turned = heif_with_transforms(&plain, turns, mirror);
        let reference = libheif_decode(&turned);
        assert_eq!(
            (reference.dimensions(), red_corner(&reference)),
            (size, corner)
        );
        let done = finished(&app, &token, turned).await;
        assert_eq!(done["status"], "succeeded", "{turns} {mirror:?} {done}");
        let sent = sent_image(&mock.calls().last().unwrap().body);
        assert_eq!(
            sent.dimensions(),
            reference.dimensions(),
            "{turns} {mirror:?}"
        );
        assert_eq!(
            red_corner(&sent),
            red_corner(&reference),
            "irot {turns}, imir {mirror:?}"
        );
    }
    assert_eq!(mock.calls().len(), 4);
    app.assert_store_empties().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heic_bomb_is_refused_by_the_limits_before_claude_is_called() {
    let (mock, base) = Mock::start(Vec::new(), None).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("bomber");
    // A small photo whose every `ispe` declares 60,000 x 60,000 pixels.
    let mut bomb = heif_enc(&[&record_jpeg(64, 64, None)], &[]);
    let mut found = 0;
    while let Some(at) = bomb
        .windows(4)
        .enumerate()
        .skip(found)
        .find(|(_, w)| *w == b"ispe")
        .map(|(i, _)| i)
    {
        bomb[at + 8..at + 12].copy_from_slice(&60_000u32.to_be_bytes());
        bomb[at + 12..at + 16].copy_from_slice(&60_000u32.to_be_bytes());
        found = at + 4;
    }
    assert!(found > 0, "an ispe box");
    let done = finished(&app, &token, bomb).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "document-too-complex");
    assert!(mock.calls().is_empty());
    app.assert_store_empties().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_heic_and_any_avif_are_refused_with_advice_on_both_routes() {
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| s.heic = false).await;
    let token = app.token("iphone");
    let photo = heif_enc(&[&record_jpeg(320, 240, None)], &[]);
    let avif = heif_enc(&[&record_jpeg(64, 48, None)], &["-A"]);
    assert_eq!(&avif[4..12], b"ftypavif");
    for (bytes, advice) in [(&photo, "Settings > Camera > Formats"), (&avif, "AVIF")] {
        let r = app.upload(&token, bytes.clone(), "image/heic").await;
        let problem = assert_problem(r, 415, "unsupported-media-type").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("JPEG") && detail.contains(advice),
            "{detail}"
        );
        // tus: refused when the first bytes tell, and the upload ends.
        let path = create(&app, &token, bytes.len()).await;
        let r = patch(&app, &token, &path, 0, bytes).await;
        let problem = assert_problem(r, 415, "unsupported-media-type").await;
        assert!(problem["detail"].as_str().unwrap().contains(advice));
        // tus creation-with-upload: the same 415, and no upload is left.
        let r = crate::tus::tus(&app, "POST", "/v1/uploads", &token)
            .header("upload-length", bytes.len().to_string())
            .header("content-type", "application/offset+octet-stream")
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        let problem = assert_problem(r, 415, "unsupported-media-type").await;
        assert!(problem["detail"].as_str().unwrap().contains(advice));
    }
    assert!(app.list_jobs(&token).await.is_empty());
    app.assert_store_empties().await;
    app.stop().await;

    // Switched on, AVIF is still refused: no AV1 decoder here.
    let app = TestApp::spawn(Backend::SqliteFolder).await;
    let r = app.upload(&app.token("android"), avif, "image/avif").await;
    let problem = assert_problem(r, 415, "unsupported-media-type").await;
    assert!(problem["detail"].as_str().unwrap().contains("AVIF"));
    app.stop().await;
}
