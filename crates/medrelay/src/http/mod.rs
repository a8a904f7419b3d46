//! The REST API of api.md: routes, the OpenAPI document generated from them, and the layers
//! every request passes (request ids, panic containment, problem+json for every error).
//!
//! Handlers answer with ids and states; only the owner of a job ever receives its result.

mod demo;
mod documents;
mod jobs;
mod ops;
mod schema;
mod uploads;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "medrelay",
        description = "Upload a medical document, get structured data back asynchronously; nothing is kept.",
    ),
    modifiers(&BearerAuth),
    tags((name = "documents"), (name = "uploads", description = "Resumable uploads, tus 1.0.0"), (name = "jobs"), (name = "operations")),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Every route, as the OpenAPI document describes them.
fn api_router() -> OpenApiRouter<AppState> {
    app_routes().merge(ops_routes())
}

/// The routes of the app.
fn app_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(documents::create_document))
        .routes(routes!(uploads::discover, uploads::create_upload))
        .routes(routes!(
            uploads::upload_offset,
            uploads::append,
            uploads::terminate
        ))
        .routes(routes!(jobs::list_jobs))
        .routes(routes!(jobs::get_job, jobs::delete_job))
        .routes(routes!(jobs::job_events))
        .routes(routes!(jobs::delete_my_data))
}

/// The operations routes: on the main address, or only on `MEDRELAY_ADMIN_LISTEN` when set.
fn ops_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
}

/// The OpenAPI document, generated from the handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut api = api_router().into_openapi();
    refine_openapi(&mut api);
    api.paths.paths.insert(
        "/openapi.json".into(),
        utoipa::openapi::path::PathItem::new(
            utoipa::openapi::HttpMethod::Get,
            utoipa::openapi::path::OperationBuilder::new()
                .tag("operations")
                .operation_id(Some("openapi"))
                .summary(Some("This OpenAPI document"))
                .response("200", utoipa::openapi::Response::new("OpenAPI 3.1 JSON"))
                .build(),
        ),
    );
    api
}

/// What the handlers' annotations cannot say: OpenAPI links from an upload's answer to the
/// operations on the job (or upload) it made, so that clients and contract fuzzers follow a
/// real job instead of guessing ids; the type of the multipart form's `file` part; and optional
/// headers that are absent rather than `null`.
fn refine_openapi(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::link::LinkBuilder;
    let link = |operation: &str, id: &str, description: &str| {
        LinkBuilder::new()
            .operation_id(operation)
            .parameter("id", id)
            .description(description)
            .build()
    };
    let follow = |api: &mut utoipa::openapi::OpenApi,
                  path: &str,
                  status: &str,
                  links: Vec<(&str, utoipa::openapi::link::Link)>| {
        let Some(item) = api.paths.paths.get_mut(path) else {
            return;
        };
        let Some(operation) = item.post.as_mut() else {
            return;
        };
        if let Some(RefOr::T(response)) = operation.responses.responses.get_mut(status) {
            for (name, link) in links {
                response.links.insert(name.into(), RefOr::T(link));
            }
        }
    };
    // The multipart form's `file` part carries a document, as the raw bodies do.
    if let Some(body) = api
        .paths
        .paths
        .get_mut("/v1/documents")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.request_body.as_mut())
        && let RefOr::T(body) = body
        && let Some(RefOr::T(form)) = body.content.get_mut("multipart/form-data")
    {
        form.encoding.insert(
            "file".into(),
            utoipa::openapi::encoding::EncodingBuilder::new()
                .content_type(Some("application/octet-stream"))
                .build(),
        );
    }
    // An optional header is absent, never `null`: its schema is the value's alone.
    for item in api.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let parameters = operation.parameters.iter_mut().flatten();
            for parameter in parameters {
                let RefOr::T(parameter) = parameter else {
                    continue;
                };
                if parameter.parameter_in != utoipa::openapi::path::ParameterIn::Header {
                    continue;
                }
                if let Some(RefOr::T(utoipa::openapi::schema::Schema::Object(object))) =
                    parameter.schema.as_mut()
                    && let utoipa::openapi::schema::SchemaType::Array(types) = &object.schema_type
                {
                    let types: Vec<_> = types
                        .iter()
                        .filter(|t| **t != utoipa::openapi::schema::Type::Null)
                        .cloned()
                        .collect();
                    if let [only] = types.as_slice() {
                        object.schema_type =
                            utoipa::openapi::schema::SchemaType::Type(only.clone());
                    }
                }
            }
        }
    }
    // A tus creation carries its first bytes only optionally.
    if let Some(RefOr::T(body)) = api
        .paths
        .paths
        .get_mut("/v1/uploads")
        .and_then(|item| item.post.as_mut())
        .and_then(|operation| operation.request_body.as_mut())
    {
        body.required = Some(utoipa::openapi::Required::False);
    }
    let job_id = "$response.body#/id";
    follow(
        api,
        "/v1/documents",
        "202",
        vec![
            (
                "GetJob",
                link("get_job", job_id, "The job this upload made"),
            ),
            (
                "JobEvents",
                link("job_events", job_id, "Its changes as they happen"),
            ),
            (
                "DeleteJob",
                link("delete_job", job_id, "Delete it and its data now"),
            ),
        ],
    );
    // The upload's id, from its Location. The `#regex:` suffix is schemathesis's extension of
    // runtime expressions (OpenAPI has none that takes part of a header); the description says
    // it in words for other tools.
    let upload_id = "$response.header.Location#regex:/v1/uploads/(.+)";
    follow(
        api,
        "/v1/uploads",
        "201",
        vec![
            (
                "UploadOffset",
                link("upload_offset", upload_id, "Where the upload stands"),
            ),
            ("Append", link("append", upload_id, "Send the next bytes")),
            (
                "Terminate",
                link("terminate", upload_id, "Delete the upload now"),
            ),
        ],
    );
}

/// The main address: the app's routes, the OpenAPI document, and the operations routes
/// unless an admin address serves them.
pub fn router(state: AppState) -> Router {
    let routes = if state.settings.admin_listen.is_some() {
        app_routes()
    } else {
        api_router()
    };
    let (router, _) = routes.split_for_parts();
    let spec = openapi();
    let mut router = router.route(
        "/openapi.json",
        axum::routing::get(move || async move { axum::Json(spec) }),
    );
    if state.settings.demo_enabled() {
        router = router.merge(demo::routes(&state.settings));
    }
    let router = with_layers(router, state);
    // Layers of a router run after its routing; the method must be replaced before.
    Router::new()
        .fallback_service(router)
        .layer(middleware::from_fn(tus_method_override))
}

/// The admin address (`MEDRELAY_ADMIN_LISTEN`): the operations routes only.
pub fn admin_router(state: AppState) -> Router {
    let (router, _) = ops_routes().split_for_parts();
    with_layers(router, state)
}

/// What every request passes, on either address.
fn with_layers(router: Router<AppState>, state: AppState) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    router
        .fallback(|| async { ApiError::RouteNotFound })
        // Upload limits are enforced while streaming, with the configured maximum.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn(problem_for_bare_errors))
        .layer(middleware::from_fn(tus_protocol))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal(anyhow::anyhow!("a request handler panicked")).into_response()
        }))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            // The path holds only opaque ids; query strings are never logged.
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .layer(SetSensitiveRequestHeadersLayer::new([
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderName::from_static("push-token"),
        ]))
        .with_state(state)
}

fn is_tus(req: &Request) -> bool {
    let path = req.uri().path();
    path == "/v1/uploads" || path.starts_with("/v1/uploads/")
}

/// tus requests (`/v1/uploads`): `X-HTTP-Method-Override` replaces the method, for clients
/// behind proxies that pass only GET and POST. Runs before routing.
async fn tus_method_override(mut req: Request, next: Next) -> Response {
    if is_tus(&req) {
        let replaced = req
            .headers()
            .get("x-http-method-override")
            .and_then(|v| axum::http::Method::from_bytes(v.as_bytes().trim_ascii()).ok());
        if let Some(method) = replaced {
            *req.method_mut() = method;
        }
    }
    next.run(req).await
}

/// tus requests (`/v1/uploads`): every answer says `Tus-Resumable`.
async fn tus_protocol(req: Request, next: Next) -> Response {
    if !is_tus(&req) {
        return next.run(req).await;
    }
    let mut response = next.run(req).await;
    response.headers_mut().insert(
        HeaderName::from_static("tus-resumable"),
        axum::http::HeaderValue::from_static("1.0.0"),
    );
    response
}

/// Turns errors that axum produces itself (a wrong method, a rejected extractor) into
/// problem+json, so every error the app sees has the same shape.
async fn problem_for_bare_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if is_problem {
        return response;
    }
    let error = match status {
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::NOT_FOUND => ApiError::RouteNotFound,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge {
            limit: 32 * 1024 * 1024,
        },
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
            ApiError::unavailable(anyhow::anyhow!("bare {status} response"))
        }
        s if s.is_server_error() => ApiError::internal(anyhow::anyhow!("bare {s} response")),
        _ => ApiError::BadRequest("the request is malformed"),
    };
    let mut problem = error.into_response();
    for name in [axum::http::header::ALLOW, axum::http::header::RETRY_AFTER] {
        if let Some(v) = response.headers().get(&name) {
            problem.headers_mut().insert(name, v.clone());
        }
    }
    problem
}

/// An outage is a retryable 503; anything else is a 500: a bug must not look like an outage.
impl From<crate::lifecycle::Error> for ApiError {
    fn from(e: crate::lifecycle::Error) -> Self {
        match e {
            crate::lifecycle::Error::Unavailable(e) => ApiError::Unavailable(e),
            crate::lifecycle::Error::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        crate::lifecycle::Error::from(e).into()
    }
}

/// A refusal is a 429 with its `Retry-After`; a limit that could not be checked is an outage.
impl From<crate::limits::Error> for ApiError {
    fn from(e: crate::limits::Error) -> Self {
        match e {
            crate::limits::Error::Refused(refused) => ApiError::TooManyRequests {
                detail: refused.limit.detail(),
                retry_after_secs: refused.retry_after_secs(),
            },
            crate::limits::Error::Db(e) => e.into(),
        }
    }
}
