/* A C client of entrupy-tokend built on the code that gdbus-codegen generates from
 * data/com.entrupy.TokenDaemon1.xml (tests/codegen.rs builds and runs it):
 *
 *   gdbus-codegen --interface-prefix com.entrupy.TokenDaemon1. --c-namespace Entrupy \
 *                 --generate-c-code entrupy-tokend-dbus com.entrupy.TokenDaemon1.xml
 *   cc client.c entrupy-tokend-dbus.c $(pkg-config --cflags --libs gio-2.0 gio-unix-2.0)
 *
 * Usage: client OBJECT_PATH. It prints one line per step, never the token itself, and exits
 * 0 when every step worked, 1 otherwise. */
#include <gio/gio.h>
#include <stdio.h>
#include <string.h>

#include "entrupy-tokend-dbus.h"

/* The daemon's errors as a GError domain: after registration a remote
 * com.entrupy.TokenDaemon1.Error.NotAuthorized arrives as ENTRUPY_ERROR, ENTRUPY_ERROR_NOT_AUTHORIZED. */
typedef enum {
  ENTRUPY_ERROR_NOT_AUTHORIZED,
  ENTRUPY_ERROR_INVALID_ARGUMENT,
  ENTRUPY_ERROR_NO_SUCH_SESSION,
  ENTRUPY_ERROR_ALREADY_EXISTS,
  ENTRUPY_ERROR_TOO_MANY_REQUESTS,
  ENTRUPY_ERROR_UNAUTHORIZED,
  ENTRUPY_ERROR_NETWORK_ERROR,
  ENTRUPY_ERROR_BACKEND_ERROR,
  ENTRUPY_ERROR_SERVER_ERROR,
  ENTRUPY_ERROR_NOT_CONFIGURED,
  ENTRUPY_ERROR_CANCELLED,
  ENTRUPY_ERROR_ACCESS_DENIED,
  ENTRUPY_ERROR_N_ERRORS
} EntrupyError;

static const GDBusErrorEntry entrupy_error_entries[] = {
  {ENTRUPY_ERROR_NOT_AUTHORIZED, "com.entrupy.TokenDaemon1.Error.NotAuthorized"},
  {ENTRUPY_ERROR_INVALID_ARGUMENT, "com.entrupy.TokenDaemon1.Error.InvalidArgument"},
  {ENTRUPY_ERROR_NO_SUCH_SESSION, "com.entrupy.TokenDaemon1.Error.NoSuchSession"},
  {ENTRUPY_ERROR_ALREADY_EXISTS, "com.entrupy.TokenDaemon1.Error.AlreadyExists"},
  {ENTRUPY_ERROR_TOO_MANY_REQUESTS, "com.entrupy.TokenDaemon1.Error.TooManyRequests"},
  {ENTRUPY_ERROR_UNAUTHORIZED, "com.entrupy.TokenDaemon1.Error.Unauthorized"},
  {ENTRUPY_ERROR_NETWORK_ERROR, "com.entrupy.TokenDaemon1.Error.NetworkError"},
  {ENTRUPY_ERROR_BACKEND_ERROR, "com.entrupy.TokenDaemon1.Error.BackendError"},
  {ENTRUPY_ERROR_SERVER_ERROR, "com.entrupy.TokenDaemon1.Error.ServerError"},
  {ENTRUPY_ERROR_NOT_CONFIGURED, "com.entrupy.TokenDaemon1.Error.NotConfigured"},
  {ENTRUPY_ERROR_CANCELLED, "com.entrupy.TokenDaemon1.Error.Cancelled"},
  {ENTRUPY_ERROR_ACCESS_DENIED, "com.entrupy.TokenDaemon1.Error.AccessDenied"},
};

static GQuark
entrupy_error_quark (void)
{
  static gsize quark = 0;
  g_dbus_error_register_error_domain ("entrupy-tokend-error-quark", &quark, entrupy_error_entries,
                                      G_N_ELEMENTS (entrupy_error_entries));
  return (GQuark) quark;
}
#define ENTRUPY_ERROR (entrupy_error_quark ())

static GMainLoop *loop;
static guint64 signalled_expires_at;

static void
on_login_succeeded (EntrupySession *session, guint64 expires_at, gpointer user_data)
{
  (void) session;
  (void) user_data;
  signalled_expires_at = expires_at;
  printf ("LoginSucceeded: expires_at %" G_GUINT64_FORMAT "\n", expires_at);
  g_main_loop_quit (loop);
}

static gboolean
on_timeout (gpointer user_data)
{
  (void) user_data;
  printf ("timeout: no LoginSucceeded\n");
  g_main_loop_quit (loop);
  return G_SOURCE_REMOVE;
}

static int
fail (const char *what, GError *error)
{
  gchar *remote = g_dbus_error_get_remote_error (error);
  fprintf (stderr, "%s failed: %s (%s)\n", what, error->message, remote ? remote : "local error");
  g_free (remote);
  g_error_free (error);
  return 1;
}

int
main (int argc, char **argv)
{
  GError *error = NULL;
  EntrupySession *session;
  gboolean valid = FALSE;
  gchar *token = NULL;
  guint64 expires_at = 0, refreshed = 0;

  if (argc != 2)
    {
      fprintf (stderr, "usage: %s OBJECT_PATH\n", argv[0]);
      return 2;
    }
  (void) ENTRUPY_ERROR; /* register the domain before the first call */

  session = entrupy_session_proxy_new_for_bus_sync (G_BUS_TYPE_SESSION, G_DBUS_PROXY_FLAGS_NONE,
                                                    "com.entrupy.TokenDaemon1", argv[1], NULL, &error);
  if (session == NULL)
    return fail ("connecting", error);

  if (!entrupy_session_call_is_authorization_valid_sync (session, &valid, NULL, &error))
    return fail ("IsAuthorizationValid", error);
  printf ("IsAuthorizationValid: %s\n", valid ? "true" : "false");

  /* Two out-arguments: the token and its expiry. */
  if (!entrupy_session_call_ensure_valid_sync (session, 0, &token, &expires_at, NULL, &error))
    return fail ("EnsureValid", error);
  printf ("EnsureValid: token of %zu bytes, expires_at %" G_GUINT64_FORMAT "\n", strlen (token), expires_at);
  g_free (token);

  /* Properties, from the proxy's cache (kept current by PropertiesChanged). */
  printf ("State: %s\n", entrupy_session_get_state (session));
  printf ("ExpiresAt: %" G_GUINT64_FORMAT "\n", entrupy_session_get_expires_at (session));

  /* A signal: Refresh logs in again and the daemon emits LoginSucceeded. */
  loop = g_main_loop_new (NULL, FALSE);
  g_signal_connect (session, "login-succeeded", G_CALLBACK (on_login_succeeded), NULL);
  if (!entrupy_session_call_refresh_sync (session, &refreshed, NULL, &error))
    return fail ("Refresh", error);
  printf ("Refresh: expires_at %" G_GUINT64_FORMAT "\n", refreshed);
  g_timeout_add_seconds (20, on_timeout, NULL);
  g_main_loop_run (loop);
  if (signalled_expires_at == 0)
    return 1;

  /* An error of the daemon: no token after Cleanup. */
  if (!entrupy_session_call_cleanup_sync (session, NULL, &error))
    return fail ("Cleanup", error);
  if (entrupy_session_call_get_token_sync (session, &token, &expires_at, NULL, &error))
    {
      fprintf (stderr, "GetToken after Cleanup succeeded\n");
      return 1;
    }
  {
    gchar *remote = g_dbus_error_get_remote_error (error);
    printf ("GetToken after Cleanup: %s, in the registered domain: %s\n", remote,
            g_error_matches (error, ENTRUPY_ERROR, ENTRUPY_ERROR_NOT_AUTHORIZED) ? "NotAuthorized" : "no");
    g_free (remote);
    g_clear_error (&error);
  }

  g_main_loop_unref (loop);
  g_object_unref (session);
  printf ("done\n");
  return 0;
}
