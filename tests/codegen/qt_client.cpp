// A Qt client of entrupy-tokend built on the proxy classes that qdbusxml2cpp generates from
// data/com.entrupy.TokenDaemon1.xml (tests/codegen.rs builds and runs it with Qt 5 and Qt 6):
//
//   qdbusxml2cpp -p entrupy_proxy com.entrupy.TokenDaemon1.xml
//   moc entrupy_proxy.h -o moc_entrupy_proxy.cpp
//   g++ -std=c++17 -fPIC qt_client.cpp entrupy_proxy.cpp moc_entrupy_proxy.cpp \
//       $(pkg-config --cflags --libs Qt5DBus)
//
// Usage: qt_client OBJECT_PATH. Prints one line per step, never the token itself; exits 0
// when every step worked.
#include <QCoreApplication>
#include <QDBusConnection>
#include <QDBusReply>
#include <QVariantMap>
#include <cstdio>

#include "entrupy_proxy.h"

static const char *const SERVICE = "com.entrupy.TokenDaemon1";

int main(int argc, char **argv)
{
    QCoreApplication app(argc, argv);
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s OBJECT_PATH\n", argv[0]);
        return 2;
    }
    QDBusConnection bus = QDBusConnection::sessionBus();
    ComEntrupyTokenDaemon1SessionInterface session(SERVICE, QString::fromUtf8(argv[1]), bus);

    QDBusReply<bool> valid = session.IsAuthorizationValid();
    if (!valid.isValid()) {
        std::fprintf(stderr, "IsAuthorizationValid failed: %s\n", qPrintable(valid.error().name()));
        return 1;
    }
    std::printf("IsAuthorizationValid: %s\n", valid.value() ? "true" : "false");

    // Two out-arguments: the token is the reply's value, the expiry comes back through the
    // reference.
    qulonglong expiresAt = 0;
    QDBusReply<QString> token = session.EnsureValid(0, expiresAt);
    if (!token.isValid()) {
        std::fprintf(stderr, "EnsureValid failed: %s: %s\n", qPrintable(token.error().name()),
                     qPrintable(token.error().message()));
        return 1;
    }
    std::printf("EnsureValid: token of %d bytes, expires_at %llu\n", int(token.value().size()), expiresAt);
    std::printf("State: %s\n", qPrintable(session.state()));
    std::printf("ExpiresAt: %llu\n", session.expiresAt());

    // a{sv} is a QVariantMap (the QtTypeName annotation in the XML says so).
    ComEntrupyTokenDaemon1ManagerInterface manager(SERVICE, QStringLiteral("/com/entrupy/TokenDaemon1"), bus);
    QVariantMap profile;
    profile.insert(QStringLiteral("unique_user_id"), QStringLiteral("qt-user-0001"));
    profile.insert(QStringLiteral("email"), QStringLiteral("qt@example.com"));
    QDBusReply<QDBusObjectPath> added = manager.AddSession(QStringLiteral("from-qt"), profile);
    if (!added.isValid()) {
        std::fprintf(stderr, "AddSession failed: %s\n", qPrintable(added.error().name()));
        return 1;
    }
    std::printf("AddSession: %s\n", qPrintable(added.value().path()));
    QDBusReply<QDBusObjectPath> again = manager.AddSession(QStringLiteral("from-qt"), profile);
    std::printf("AddSession again: %s\n", qPrintable(again.error().name()));
    std::printf("done\n");
    return 0;
}
